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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import attrs

from kdframe.api import Features, ModelError, NoParams, PluginError, Registry, StageContext, hookimpl

if TYPE_CHECKING:
    import torch

    from kdframe_costs.matrices import Pairs

W_H = "costs.W_h"  # its name among the extra parameters and its key in ctx.state
PAIR_COSTS = "costs.pairs"  # ctx.state: a sparse mapping's step, each pair's cost with its graph, costs -> loss
TERM_KIND = {"att": "att", "hid": "hid", "pt": "cls"}  # loss term -> the cost kind it transports

Tokens = Literal["all", "real"]


@attrs.frozen
class HiddenParams:
    """``hid`` and ``emb``. ``tokens = "all"`` counts padding, as the reference code does;
    ``"real"`` averages over real tokens only."""

    tokens: Tokens = "all"  # positions that count: all (padding too, as the reference code) or real tokens


@attrs.frozen
class AttParams:
    """``att``. ``average_heads = true`` averages both models' scores over heads before
    comparing them (always, not only when the head counts differ); it is required when they do."""

    tokens: Tokens = "all"  # entries that count: all, or those whose query and key are real tokens
    average_heads: bool = False  # compare head-averaged scores (needed when the head counts differ)


def check_heads(student_heads: int, teacher_heads: int, params: AttParams) -> None:
    """Raise ModelError when the attention head counts differ and heads are not averaged."""
    if student_heads != teacher_heads and not params.average_heads:
        raise ModelError(
            f"loss att: the student has {student_heads} attention heads and the teacher"
            f" {teacher_heads}; set average_heads = true on the att loss term to average the"
            " scores over heads before comparing them"
        )


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
    registry.add("loss", "pt", params=NoParams, needs=("cls",),
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
    import torch

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
def kdframe_layer_costs(student: Features, teacher: Features, ctx: StageContext,
                        pairs: Callable[[str, int, int], torch.Tensor | None]) -> dict[str, torch.Tensor]:
    from kdframe_costs.matrices import cost_matrix, pair_costs  # torch: only once a stage trains

    shape = (ctx.student_layers, ctx.teacher_layers)
    costs, kept = {}, {}
    for kind, (s, t, keep) in _compared(student, teacher, ctx).items():
        values = pair_costs(s, t, keep, pairs(kind, *shape))  # a fixed mapping's pairs only
        costs[kind] = cost_matrix(values, shape)
        if ctx.sparse_flow:  # the loss reads the pairs with flow (kdframe_loss_terms); the mapping no graph
            kept[kind] = values
            costs[kind] = costs[kind].detach()
    ctx.state[PAIR_COSTS] = kept
    return costs


def _with_flow(values: Pairs, flow: torch.Tensor) -> torch.Tensor:
    """The cost matrix of the pairs that carry flow: the loss's backward runs through those alone
    (an optimal transport has at most M + N - 1 of the M x N), with the dense form's value."""
    from kdframe_costs.matrices import cost_matrix

    carried = {tuple(pair): values[tuple(pair)] for pair in flow.detach().nonzero().tolist()}
    return cost_matrix(carried, tuple(flow.shape))


def _compared(student: Features, teacher: Features, ctx: StageContext) -> dict[str, tuple[Any, Any, Any]]:
    """Per cost kind of the active terms: the student's and teacher's layers it compares, and the
    entries that count (kdframe_costs.matrices)."""
    from kdframe_costs.matrices import att_layers, cls_layers, hid_layers

    compared = {}
    if ctx.active("att"):
        compared["att"] = att_layers(student, teacher, ctx.losses["att"].params)
    if ctx.active("hid"):
        compared["hid"] = hid_layers(student, teacher, projection(ctx), ctx.losses["hid"].params)
    if ctx.active("pt"):
        same = student.hidden[0].shape[-1] == teacher.hidden[0].shape[-1]
        compared["cls"] = cls_layers(student, teacher, None if same else projection(ctx))
    return compared


@hookimpl
def kdframe_loss_terms(
    student: Features,
    teacher: Features | None,
    costs: dict[str, torch.Tensor],
    flows: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    ctx: StageContext,
) -> dict[str, torch.Tensor]:
    from kdframe_costs.matrices import emb_loss

    kept = ctx.state.pop(PAIR_COSTS, {})
    terms = {term: (flows[kind] * (_with_flow(kept[kind], flows[kind]) if kind in kept else costs[kind])).sum()
             for term, kind in TERM_KIND.items() if ctx.active(term)}
    if ctx.active("emb"):
        terms["emb"] = emb_loss(student, teacher, projection(ctx), ctx.losses["emb"].params)
    return terms
