"""Helpers for mapping plugins (re-exported by ``kdframe.api``): the common part of transport
solvers, the outer-product flow, and fixed flows from lists of teacher layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: kdframe.api stays free of torch until a flow is built
    import torch


def outer_flow(w_s: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """F = w_s w_t^T: every layer pair weighted by both layers' weights (detached)."""
    import torch

    return torch.outer(w_s, w_t).detach()


def solve_transport(cost: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor],
                    solve: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A flow from ``solve(d, a, b)``, a transport solver given the detached cost ``d`` (M x N) and
    the layer weights ``a`` (M) and ``b`` (N), all float64 on the CPU (only the M x N matrix moves).

    The weights are renormalised first (float32 weights drift off the simplex, and exact solvers
    check that both sides carry the same mass). A cost that is not finite has no plan: the flow is
    then ``outer_flow(a, b)`` and the non-finite loss is left to the engine (``nonfinite``). The
    flow comes back as a constant in the cost's dtype and on its device.
    """
    import torch

    a = weights[0].detach().to("cpu", torch.float64)
    b = weights[1].detach().to("cpu", torch.float64)
    a, b = a / a.sum(), b / b.sum()
    d = cost.detach().to("cpu", torch.float64)
    flow = solve(d, a, b) if torch.isfinite(d).all() else outer_flow(a, b)
    return flow.to(cost.device, cost.dtype)


def check_layer_list(layers: list[int], count: int, teacher_layers: int) -> None:
    """Raise ValueError unless ``layers`` holds ``count`` teacher layers within 1..teacher_layers."""
    if len(layers) != count:
        raise ValueError(f"layers has {len(layers)} entries, {count} are needed: {layers}")
    outside = [layer for layer in layers if not 1 <= layer <= teacher_layers]
    if outside:
        raise ValueError(f"layers {outside} are outside the teacher's layers 1..{teacher_layers}")


def fixed_flow(cost: torch.Tensor, teacher_layers: list[int], value: float) -> torch.Tensor:
    """A constant flow with ``value`` at (student row i, teacher layer ``teacher_layers[i]``, 1-indexed)
    and zero elsewhere; rows past the list stay zero."""
    import torch

    flow = torch.zeros_like(cost, requires_grad=False)
    rows = torch.arange(len(teacher_layers), device=cost.device)
    flow[rows, torch.tensor(teacher_layers, device=cost.device) - 1] = value
    return flow
