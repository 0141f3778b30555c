"""TinyBERT's one-to-one layer mapping (docs/method.md section 3): student layer m learns from teacher
layer g(m) = m*N/M, or from an explicit list. The flow is a fixed 0/1 matrix, so the layer loss
is the plain sum over layers (TinyBERT's scale).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from kdframe.api import ModelError, Registry, StageContext, check_layer_list, fixed_flow, hookimpl

if TYPE_CHECKING:
    import torch


@attrs.frozen
class OneToOneParams:
    """``layers``: the teacher layer (1-indexed) for each student layer 1..M; empty: m*N/M."""

    layers: list[int] = attrs.Factory(list)  # teacher layer (1-indexed) per student layer; empty: m*N/M


def teacher_layers_for(M: int, N: int, layers: list[int]) -> list[int]:
    """The teacher layer (1-indexed) for each student layer 1..M: ``layers``, else m*N/M."""
    if layers:
        check_layer_list(layers, M, N)
        return list(layers)
    if N % M:
        hint = [-(-m * N // M) for m in range(1, M + 1)]  # ceil(m*N/M), one valid choice
        raise ValueError(f"the teacher's layer count must be a multiple of the student's"
                         f" (N={N}, M={M}); give the teacher layer of each student layer in the"
                         f" mapping table, e.g. layers = {hint}")
    return [m * N // M for m in range(1, M + 1)]


def _layers(ctx: StageContext) -> list[int]:
    try:
        return teacher_layers_for(ctx.student_layers, ctx.teacher_layers, ctx.mapping.params.layers)
    except ValueError as exc:
        raise ModelError(f"mapping one-to-one: {exc}") from None


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add("mapping", "one-to-one", params=OneToOneParams, keeps_marginals=False, fixed=True, sparse_flow=True,
                 description="TinyBERT: student layer m learns from teacher layer m*N/M")


@hookimpl
def kdframe_stage_start(ctx: StageContext) -> None:
    if ctx.mapping and ctx.mapping.name == "one-to-one":
        _layers(ctx)  # fail before the first step, naming N and M


@hookimpl
def kdframe_layer_mapping(
    kind: str, cost: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], ctx: StageContext
) -> torch.Tensor | None:
    if ctx.mapping is None or ctx.mapping.name != "one-to-one":
        return None
    return fixed_flow(cost, _layers(ctx), 1.0)
