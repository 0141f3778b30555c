"""BERT-PKD's patient mapping (docs/method.md section 6): student layers 1..M-1 learn from chosen
teacher layers; the student's last layer is left to the prediction loss. Flow entries are
1/(M-1), so sum(F * D) is the mean over the chosen pairs, as PKD's MSE over stacked layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from kdframe.api import ModelError, Registry, StageContext, check_layer_list, fixed_flow, hookimpl

if TYPE_CHECKING:
    import torch


@attrs.frozen
class PkdParams:
    """``choice``: "skip" takes every (N/M)-th teacher layer, "last" the M-1 layers before the
    teacher's last. ``layers`` (1-indexed teacher layers for student layers 1..M-1) overrides
    ``choice`` when given."""

    choice: Literal["skip", "last"] = "skip"  # every (N/M)-th teacher layer, or the M-1 before the last
    layers: list[int] = attrs.Factory(list)  # teacher layers (1-indexed) for student layers 1..M-1; overrides choice


def pkd_teacher_layers(M: int, N: int, choice: str, layers: list[int]) -> list[int]:
    """The teacher layer (1-indexed) for each student layer 1..M-1."""
    if M < 2:
        raise ValueError(f"the student needs at least 2 layers (M={M}): its last one is left to the prediction loss")
    if layers:
        check_layer_list(layers, M - 1, N)
        return list(layers)
    if M > N:
        raise ValueError(f"the student must not be deeper than the teacher (N={N}, M={M}); give layers")
    if choice == "last":
        return list(range(N - M + 1, N))
    if N % M:
        raise ValueError(f'choice "skip" needs N % M == 0 (N={N}, M={M}); use choice = "last" or give layers')
    return [k * N // M for k in range(1, M)]


def _layers(ctx: StageContext) -> list[int]:
    params = ctx.mapping.params
    try:
        return pkd_teacher_layers(ctx.student_layers, ctx.teacher_layers, params.choice, params.layers)
    except ValueError as exc:
        raise ModelError(f"mapping pkd: {exc}") from None


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add("mapping", "pkd", params=PkdParams, keeps_marginals=False, fixed=True, sparse_flow=True,
                 description="BERT-PKD: student layers 1..M-1 against skip/last teacher layers, mean over pairs")


@hookimpl
def kdframe_stage_start(ctx: StageContext) -> None:
    if ctx.mapping and ctx.mapping.name == "pkd":
        _layers(ctx)  # fail before the first step, naming N and M


@hookimpl
def kdframe_layer_mapping(
    kind: str, cost: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], ctx: StageContext
) -> torch.Tensor | None:
    if ctx.mapping is None or ctx.mapping.name != "pkd":
        return None
    return fixed_flow(cost, _layers(ctx), 1.0 / (ctx.student_layers - 1))
