"""Layer weightings (docs/method.md section 4): ``cost-attention`` moves weight to layers that transfer
cheaply, gradient-free, after every solve; ``uniform`` keeps the weights as they are."""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from kdframe.api import StageContext, Registry, bounded, hookimpl

Weights = dict[str, tuple[torch.Tensor, torch.Tensor]]


@attrs.frozen
class CostAttentionParams:
    """``normalize = "sum"``: the current reference code; ``"softmax"``: the paper-era code with
    ``temperature`` (T_emd) and a second plain softmax after averaging. ``separate = true`` keeps
    one set of weights per cost kind instead of feeding their average to every kind. ``eps``
    floors the cost ratios and the weights so that a zero cost cannot produce 0/0."""

    normalize: Literal["sum", "softmax"] = "sum"
    temperature: float = bounded(1.0, gt=0)
    separate: bool = False
    eps: float = bounded(1e-8, gt=0)


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
def cost_attention(flows: dict[str, torch.Tensor], costs: dict[str, torch.Tensor], weights: Weights,
                   params: CostAttentionParams) -> Weights:
    """One cost-attention update of every kind's (student, teacher) weights."""
    new = {}
    for kind, (w_s, w_t) in weights.items():
        moved = flows[kind].detach() * costs[kind].detach()
        new[kind] = (_attend(moved.sum(1), w_s, params), _attend(moved.sum(0), w_t, params))
    if not params.separate:
        avg_s = torch.stack([s for s, _ in new.values()]).mean(0)
        avg_t = torch.stack([t for _, t in new.values()]).mean(0)
        if params.normalize == "softmax":  # the published runs' second softmax
            avg_s, avg_t = torch.softmax(avg_s, 0), torch.softmax(avg_t, 0)
        new = dict.fromkeys(new, (avg_s, avg_t))
    return {kind: (_on_simplex(new[kind][0], w_s, params.eps), _on_simplex(new[kind][1], w_t, params.eps))
            for kind, (w_s, w_t) in weights.items()}


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add("weighting", "cost-attention", params=CostAttentionParams,
                 description="reweight layers by transported cost per unit of weight (BERT-EMD)")
    registry.add("weighting", "uniform", description="keep the layer weights as they are (uniform)")


@hookimpl
def kdframe_update_layer_weights(
    flows: dict[str, torch.Tensor], costs: dict[str, torch.Tensor], weights: Weights, ctx: StageContext
) -> Weights | None:
    name = ctx.weighting.name if ctx.weighting else None
    if name == "cost-attention":
        return cost_attention(flows, costs, weights, ctx.weighting.params)
    if name == "uniform":
        return dict(weights)
    return None
