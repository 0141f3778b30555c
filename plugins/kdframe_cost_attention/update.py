"""The cost-attention update itself (docs/method.md section 4), imported at the first update."""

from __future__ import annotations

import torch

from kdframe.api import LayerWeights

from kdframe_cost_attention import CostAttentionParams


def _attend(moved: torch.Tensor, w: torch.Tensor, params: CostAttentionParams) -> torch.Tensor:
    """New weights of one side from its transported costs c (one entry per layer)."""
    ratio = (moved / w).clamp_min(params.eps)  # cost per unit of weight
    score = ratio.sum() / ratio
    if params.normalize == "sum":
        return score / score.sum()
    return torch.softmax(score / params.temperature, 0)


def _on_simplex(w: torch.Tensor, like: torch.Tensor, eps: float) -> torch.Tensor:
    """Strictly positive, finite, summing to 1, in ``like``'s dtype and device."""
    w = torch.where(torch.isfinite(w), w, 0.0).clamp_min(eps)  # a NaN cost must not poison the weights
    return (w / w.sum()).to(like.device, like.dtype)


@torch.no_grad()
def cost_attention(flows: dict[str, torch.Tensor], costs: dict[str, torch.Tensor], weights: LayerWeights,
                   params: CostAttentionParams) -> LayerWeights:
    """One cost-attention update of every kind's (student, teacher) weights."""
    new = {}
    for kind, (w_s, w_t) in weights.items():
        moved = flows[kind].detach() * costs[kind].detach()
        new[kind] = (_attend(moved.sum(1), w_s, params), _attend(moved.sum(0), w_t, params))
    if not params.separate:
        pairs = list(new.values())
        if params.single_kind == "half-step" and len(pairs) == 1:
            # The reference averages with the other kind's weights, which stay uniform while it is off.
            (s, t), = pairs
            pairs.append((torch.full_like(s, 1 / len(s)), torch.full_like(t, 1 / len(t))))
        avg = (torch.stack([s for s, _ in pairs]).mean(0), torch.stack([t for _, t in pairs]).mean(0))
        new = dict.fromkeys(new, avg)
    if params.normalize == "softmax":  # the published runs' second softmax, separate or not
        new = {kind: (torch.softmax(s, 0), torch.softmax(t, 0)) for kind, (s, t) in new.items()}
    return {kind: (_on_simplex(new[kind][0], w_s, params.eps), _on_simplex(new[kind][1], w_t, params.eps))
            for kind, (w_s, w_t) in weights.items()}
