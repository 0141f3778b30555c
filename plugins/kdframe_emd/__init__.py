"""Many-to-many layer mappings (method.md section 3): ``emd``, the exact balanced optimal
transport between student and teacher layers (BERT-EMD), and ``uniform``, F = w^S (w^T)^T."""

from __future__ import annotations

import ot
import torch

from kdframe.api import StageContext, StrategyRegistry, hookimpl


def uniform_flow(w_s: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """F = w^S (w^T)^T: every layer pair weighted, no optimisation."""
    return torch.outer(w_s, w_t).detach()


def emd_flow(cost: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """argmin_F sum F*D with row sums w^S and column sums w^T, solved exactly by POT.

    Solved on the detached cost in float64 on the CPU (only the M x N matrix moves); the flow
    comes back as a constant in the cost's dtype and device.
    """
    a = w_s.detach().to("cpu", torch.float64)
    b = w_t.detach().to("cpu", torch.float64)
    a, b = a / a.sum(), b / b.sum()  # float32 weights drift off the simplex; POT checks the sums
    d = cost.detach().to("cpu", torch.float64)
    if not torch.isfinite(d).all():
        flow = uniform_flow(a, b)  # no plan exists; the loss is non-finite and the engine decides
    else:
        flow = torch.from_numpy(ot.emd(a.numpy(), b.numpy(), d.numpy()))
    return flow.to(cost.device, cost.dtype)


@hookimpl
def kdframe_register_strategies(registry: StrategyRegistry) -> None:
    registry.add("mapping", "emd", description="exact optimal transport between layers (BERT-EMD)")
    registry.add("mapping", "uniform", description="F = w_s w_t^T: all pairs, no optimisation (ablation)")


@hookimpl
def kdframe_layer_mapping(
    kind: str, cost: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], ctx: StageContext
) -> torch.Tensor | None:
    name = ctx.mapping.name if ctx.mapping else None
    if name == "emd":
        return emd_flow(cost, *weights)
    if name == "uniform":
        return uniform_flow(*weights).to(cost.device, cost.dtype)
    return None
