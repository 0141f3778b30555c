"""The cost matrices and the embedding loss themselves (docs/method.md sections 1, 2, 5, 6),
imported at the first step."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kdframe.api import Features

from kdframe_costs import AttParams, HiddenParams, check_heads


Layers = tuple[list[torch.Tensor], list[torch.Tensor], Any]  # student layers, teacher layers, entry count


def _masked(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], keep: torch.Tensor | None) -> Layers:
    """Both sides in float32 with the entries ``keep`` drops zeroed, and how many entries count."""
    s, t = [layer.float() for layer in student], [layer.float() for layer in teacher]
    count: Any = s[0].numel()
    if keep is not None:
        keep = keep.float()
        s, t = [layer * keep for layer in s], [layer * keep for layer in t]  # (s*k - t*k)^2 = k (s - t)^2
        count = keep.expand(s[0].shape).sum()
    return s, t, count


Pairs = dict[tuple[int, int], torch.Tensor]  # (student layer, teacher layer) -> that pair's D, with its graph


def pair_costs(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], keep: torch.Tensor | None = None,
               pairs: torch.Tensor | None = None) -> Pairs:
    """D[i, j] = mean of (student[i] - teacher[j])^2 over the entries where ``keep`` is 1, each pair
    a scalar of its own: a loss over some pairs backpropagates through those pairs alone.

    ``student`` (M layers) and ``teacher`` (N layers) hold tensors of one shape, as sequences or
    stacked along dim 0 (not stacked here: each pair is read on its own). ``keep`` is a 0/1 tensor
    broadcastable to that shape (None keeps every entry); ``pairs`` (a boolean M x N mask) limits
    the pairs computed. One pass over the differences per pair: the one-matmul expansion
    ||a||^2 + ||b||^2 - 2 a.b cancels the small costs of close layers (where training starts) in
    float32, and in float64 it took more time and memory than these M*N passes at kdframe's sizes
    (docs/performance.md). Float32 even under autocast.
    """
    with torch.autocast(student[0].device.type, enabled=False):
        s, t, count = _masked(student, teacher, keep)
        chosen = pairs.nonzero().tolist() if pairs is not None else itertools.product(range(len(s)), range(len(t)))
        # mse_loss keeps only its two inputs for the backward, no differences
        return {(i, j): F.mse_loss(s[i], t[j], reduction="sum") / count for i, j in chosen}


def cost_matrix(values: Pairs, shape: tuple[int, int]) -> torch.Tensor:
    """The M x N matrix of ``values``, 0 at the pairs it lacks."""
    stacked = torch.stack(list(values.values()))
    rows, cols = torch.tensor(list(values), dtype=torch.long, device=stacked.device).unbind(1)
    return torch.zeros(shape, device=stacked.device, dtype=stacked.dtype).index_put((rows, cols), stacked)


def pairwise_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """The M x N matrix of ``pair_costs`` over every pair."""
    return cost_matrix(pair_costs(student, teacher, keep), (len(student), len(teacher)))


def att_layers(student: Features, teacher: Features, params: AttParams) -> tuple[list, list, torch.Tensor | None]:
    """What D^att compares: the (B, h, L, L) scores of each layer (head-averaged when asked), and
    the entries that count."""
    s, t = student.attn, teacher.attn
    check_heads(s[0].shape[1], t[0].shape[1], params)
    if params.average_heads:
        s, t = [a.mean(1, keepdim=True) for a in s], [a.mean(1, keepdim=True) for a in t]
    keep = None
    if params.tokens == "real":
        mask = student.mask.float()
        keep = (mask[:, :, None] * mask[:, None, :])[:, None]  # (B, 1, L, L): real query and key
    return list(s), list(t), keep


def att_cost(student: Features, teacher: Features, params: AttParams) -> torch.Tensor:
    """D^att[i, j] = mean over (B, h, L, L) of (A^S_i - A^T_j)^2."""
    return pairwise_mse(*att_layers(student, teacher, params))


def _token_keep(mask: torch.Tensor, tokens: str) -> torch.Tensor | None:
    """Which (B, L, 1) hidden-state entries count: all of them, or real tokens only."""
    return mask[:, :, None] if tokens == "real" else None


def hid_layers(student: Features, teacher: Features, proj: torch.nn.Module,
               params: HiddenParams) -> tuple[list, list, torch.Tensor | None]:
    """What D^hid compares: layers 1..M through W_h (B, L, d_T), layers 1..N, the entries that count."""
    return [proj(h) for h in student.hidden[1:]], list(teacher.hidden[1:]), _token_keep(student.mask, params.tokens)


def hid_cost(student: Features, teacher: Features, proj: torch.nn.Module, params: HiddenParams) -> torch.Tensor:
    """D^hid[i, j] = mean over (B, L, d_T) of (H^S_i W_h - H^T_j)^2, layers 1..M against 1..N."""
    return pairwise_mse(*hid_layers(student, teacher, proj, params))


def cls_layers(student: Features, teacher: Features, proj: torch.nn.Module | None) -> tuple[Any, Any, None]:
    """What D^cls compares: the L2-normalised [CLS] vector of each layer (student's through W_h
    when the hidden sizes differ), stacked (layers, B, d)."""
    s = torch.stack([h[:, 0] for h in student.hidden[1:]])  # (M, B, d_S): [CLS] of each layer
    if proj is not None:
        s = proj(s)
    t = torch.stack([h[:, 0] for h in teacher.hidden[1:]])
    return F.normalize(s, dim=-1), F.normalize(t, dim=-1), None


def cls_cost(student: Features, teacher: Features, proj: torch.nn.Module | None) -> torch.Tensor:
    """D^cls[i, j] = mean over (B, d) of (norm(cls^S_i [W_h]) - norm(cls^T_j))^2 (PKD's L_PT).

    ``proj`` is W_h when the hidden sizes differ (PKD itself cannot compare them otherwise), None
    when they are equal.
    """
    return pairwise_mse(*cls_layers(student, teacher, proj))


def emb_loss(student: Features, teacher: Features, proj: torch.nn.Module, params: HiddenParams) -> torch.Tensor:
    """L_emb = mean over (B, L, d_T) of (H^S_0 W_h - H^T_0)^2."""
    s, t = proj(student.hidden[0])[None], teacher.hidden[0][None]
    return pairwise_mse(s, t, _token_keep(student.mask, params.tokens))[0, 0]
