"""Layer cost matrices and the loss terms built on them (docs/method.md sections 1, 2, 5, 6).

Cost kinds, each an (M, N) matrix of student layers 1..M against teacher layers 1..N that keeps
its autograd graph: ``att`` (attention scores), ``hid`` (hidden states through W_h) and ``cls``
(PKD's L2-normalised [CLS] vectors). Loss terms: ``att``, ``hid`` and ``pt`` are sum(F * D) of
their kind (``pt`` transports ``cls``); ``emb`` compares the embedding outputs one-to-one.

The student's hidden states go through ONE shared trainable projection W_h: d_S -> d_T, returned
by ``kdframe_extra_parameters`` and read back from ``ctx.state`` so the engine's trained object
is the one used here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F

from kdframe.api import (
    Features,
    ModelError,
    NoParams,
    PluginError,
    StageContext,
    Registry,
    hookimpl,
)

W_H = "costs.W_h"  # its name among the extra parameters and its key in ctx.state
TERM_KIND = {"att": "att", "hid": "hid", "pt": "cls"}  # loss term -> the cost kind it transports

Tokens = Literal["all", "real"]


@attrs.frozen
class HiddenParams:
    """``hid`` and ``emb``. ``tokens = "all"`` counts padding, as the reference code does;
    ``"real"`` averages over real tokens only."""

    tokens: Tokens = "all"


@attrs.frozen
class AttParams:
    """``att``. ``average_heads = true`` averages both models' scores over heads before
    comparing them (always, not only when the head counts differ); it is required when they do."""

    tokens: Tokens = "all"
    average_heads: bool = False


def pairwise_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """D[i, j] = mean of (student[i] - teacher[j])^2 over the entries where ``keep`` is 1.

    ``student`` (M layers) and ``teacher`` (N layers) hold tensors of one shape, as sequences or
    stacked along dim 0 (not stacked here: each pair is read on its own). ``keep`` is a 0/1 tensor
    broadcastable to that shape (None keeps every entry). One pass over the differences per pair:
    the one-matmul expansion ||a||^2 + ||b||^2 - 2 a.b cancels the small costs of close layers
    (where training starts) in float32, and in float64 it took more time and memory than these
    M*N passes at kdframe's sizes (docs/performance.md). Float32 even under autocast.
    """
    with torch.autocast(student[0].device.type, enabled=False):
        s, t = [layer.float() for layer in student], [layer.float() for layer in teacher]
        count: Any = s[0].numel()
        if keep is not None:
            keep = keep.float()
            s, t = [layer * keep for layer in s], [layer * keep for layer in t]  # (s*k - t*k)^2 = k (s - t)^2
            count = keep.expand(s[0].shape).sum()
        # mse_loss keeps only its two inputs for the backward, no differences
        return torch.stack([torch.stack([F.mse_loss(s_i, t_j, reduction="sum") for t_j in t]) for s_i in s]) / count


def check_heads(student_heads: int, teacher_heads: int, params: AttParams) -> None:
    """Raise ModelError when the attention head counts differ and heads are not averaged."""
    if student_heads != teacher_heads and not params.average_heads:
        raise ModelError(
            f"loss att: the student has {student_heads} attention heads and the teacher"
            f" {teacher_heads}; set average_heads = true on the att loss term to average the"
            " scores over heads before comparing them"
        )


def att_cost(student: Features, teacher: Features, params: AttParams) -> torch.Tensor:
    """D^att[i, j] = mean over (B, h, L, L) of (A^S_i - A^T_j)^2."""
    s, t = student.attn, teacher.attn  # layers of (B, h, L, L)
    check_heads(s[0].shape[1], t[0].shape[1], params)
    if params.average_heads:
        s, t = [a.mean(1, keepdim=True) for a in s], [a.mean(1, keepdim=True) for a in t]
    keep = None
    if params.tokens == "real":
        mask = student.mask.float()
        keep = (mask[:, :, None] * mask[:, None, :])[:, None]  # (B, 1, L, L): real query and key
    return pairwise_mse(s, t, keep)


def _token_keep(mask: torch.Tensor, tokens: str) -> torch.Tensor | None:
    """Which (B, L, 1) hidden-state entries count: all of them, or real tokens only."""
    return mask[:, :, None] if tokens == "real" else None


def hid_cost(student: Features, teacher: Features, proj: torch.nn.Module, params: HiddenParams) -> torch.Tensor:
    """D^hid[i, j] = mean over (B, L, d_T) of (H^S_i W_h - H^T_j)^2, layers 1..M against 1..N."""
    s = [proj(h) for h in student.hidden[1:]]  # (B, L, d_T) per layer
    return pairwise_mse(s, teacher.hidden[1:], _token_keep(student.mask, params.tokens))


def cls_cost(student: Features, teacher: Features, proj: torch.nn.Module | None) -> torch.Tensor:
    """D^cls[i, j] = mean over (B, d) of (norm(cls^S_i [W_h]) - norm(cls^T_j))^2 (PKD's L_PT).

    ``proj`` is W_h when the hidden sizes differ (PKD itself cannot compare them otherwise), None
    when they are equal.
    """
    s = torch.stack([h[:, 0] for h in student.hidden[1:]])  # (M, B, d_S): [CLS] of each layer
    if proj is not None:
        s = proj(s)
    t = torch.stack([h[:, 0] for h in teacher.hidden[1:]])
    return pairwise_mse(F.normalize(s, dim=-1), F.normalize(t, dim=-1))


def emb_loss(student: Features, teacher: Features, proj: torch.nn.Module, params: HiddenParams) -> torch.Tensor:
    """L_emb = mean over (B, L, d_T) of (H^S_0 W_h - H^T_0)^2."""
    s, t = proj(student.hidden[0])[None], teacher.hidden[0][None]
    return pairwise_mse(s, t, _token_keep(student.mask, params.tokens))[0, 0]


def projection(ctx: StageContext) -> torch.nn.Module:
    """W_h as created by ``kdframe_extra_parameters`` (and trained by the engine)."""
    try:
        return ctx.state[W_H]
    except KeyError:
        raise PluginError(f"costs: {W_H} is missing from ctx.state; kdframe_extra_parameters must run at stage start") from None


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add("loss", "att", params=AttParams, needs=("attn",),
                 description="attention scores, sum over the flow of the att cost")
    registry.add("loss", "hid", params=HiddenParams, needs=("hidden",),
                 description="hidden states through W_h, sum over the flow of the hid cost")
    registry.add("loss", "emb", params=HiddenParams, needs=("hidden",),
                 description="embedding outputs through W_h, one-to-one MSE")
    registry.add("loss", "pt", params=NoParams, needs=("hidden",),
                 description="PKD patient loss: normalised [CLS] vectors, sum over the flow of the cls cost")


@hookimpl
def kdframe_validate_recipe(recipe: Any, registry: Registry) -> list[str]:
    problems = []
    for i, stage in enumerate(recipe.stages):
        mapped = sorted(term for term, loss in stage.losses.items() if term in TERM_KIND and loss.weight != 0)
        if mapped and stage.mapping is None:
            problems.append(f"stages[{i}].mapping: loss terms {', '.join(mapped)} need a layer mapping,"
                            ' e.g. mapping = { strategy = "emd" }')
    return problems


@hookimpl
def kdframe_extra_parameters(ctx: StageContext) -> dict[str, torch.nn.Module]:
    d_s, d_t = ctx.student_hidden_size, ctx.teacher_hidden_size
    if not (ctx.active("hid") or ctx.active("emb") or (ctx.active("pt") and d_s != d_t)):
        return {}  # pt alone compares equal-sized [CLS] vectors directly
    ctx.state[W_H] = torch.nn.Linear(d_s, d_t)
    return {W_H: ctx.state[W_H]}


@hookimpl
def kdframe_stage_start(ctx: StageContext) -> None:
    if ctx.active("att"):
        check_heads(ctx.student_heads, ctx.teacher_heads, ctx.losses["att"].params)  # fail before training


@hookimpl
def kdframe_layer_costs(student: Features, teacher: Features, ctx: StageContext) -> dict[str, torch.Tensor]:
    costs = {}
    if ctx.active("att"):
        costs["att"] = att_cost(student, teacher, ctx.losses["att"].params)
    if ctx.active("hid"):
        costs["hid"] = hid_cost(student, teacher, projection(ctx), ctx.losses["hid"].params)
    if ctx.active("pt"):
        same = student.hidden[0].shape[-1] == teacher.hidden[0].shape[-1]
        costs["cls"] = cls_cost(student, teacher, None if same else projection(ctx))
    return costs


@hookimpl
def kdframe_loss_terms(
    student: Features,
    teacher: Features | None,
    costs: dict[str, torch.Tensor],
    flows: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    ctx: StageContext,
) -> dict[str, torch.Tensor]:
    terms = {term: (flows[kind] * costs[kind]).sum() for term, kind in TERM_KIND.items() if ctx.active(term)}
    if ctx.active("emb"):
        terms["emb"] = emb_loss(student, teacher, projection(ctx), ctx.losses["emb"].params)
    return terms
