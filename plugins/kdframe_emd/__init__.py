"""Many-to-many layer mappings (docs/method.md section 3): ``emd``, the exact balanced optimal
transport between student and teacher layers (BERT-EMD), and ``uniform``, F = w^S (w^T)^T."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdframe.api import Registry, StageContext, hookimpl, outer_flow, solve_transport

if TYPE_CHECKING:
    import torch


def emd_flow(cost: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """argmin_F sum F*D with row sums w^S and column sums w^T, solved exactly by POT's network
    simplex (in float64 on the CPU, ``kdframe.api.solve_transport``)."""
    import ot  # imported at the first solve: commands that train nothing never pay for POT and torch
    import torch

    return solve_transport(cost, (w_s, w_t), lambda d, a, b: torch.from_numpy(ot.emd(a.numpy(), b.numpy(), d.numpy())))


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add("mapping", "emd", sparse_flow=True, description="exact optimal transport between layers (BERT-EMD)")
    registry.add("mapping", "uniform", description="F = w_s w_t^T: all pairs, no optimisation (ablation)")


@hookimpl
def kdframe_layer_mapping(
    kind: str, cost: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], ctx: StageContext
) -> torch.Tensor | None:
    name = ctx.mapping.name if ctx.mapping else None
    if name == "emd":
        return emd_flow(cost, *weights)
    if name == "uniform":
        return outer_flow(*weights).to(cost.device, cost.dtype)
    return None
