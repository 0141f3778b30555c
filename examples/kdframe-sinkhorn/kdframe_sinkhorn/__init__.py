"""The ``sinkhorn`` layer mapping: entropic optimal transport between student and teacher layers.

Where ``emd`` solves the exact transport problem (a sparse flow, a vertex of the transport
polytope), Sinkhorn (Cuturi, 2013) adds an entropy term and solves

    F = argmin_F  sum_ij F_ij D_ij  -  reg * H(F)    s.t.  F 1 = w^S,  F^T 1 = w^T,  F >= 0

with H(F) = -sum_ij F_ij (log F_ij - 1). The flow is dense and smooth in D: every layer pair
gets some weight, more as ``reg`` grows (``reg`` -> infinity gives w^S (w^T)^T, the ``uniform``
mapping; ``reg`` -> 0 gives the EMD flow).

A third-party plugin: it imports only from ``kdframe.api`` and reaches the engine only through
hooks, found by kdframe through the ``kdframe`` entry point in its pyproject.toml.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from kdframe.api import Registry, StageContext, bounded, hookimpl, solve_transport

if TYPE_CHECKING:
    import torch

#: Largest D / reg for the plain solver: with exp(-200) ~ 1e-87 in its kernel, its scaling
#: vectors stay far inside float64's range.
_PLAIN_RANGE = 200.0


@attrs.frozen
class SinkhornParams:
    """``reg``: the entropic regularisation (> 0); smaller is closer to EMD and slower to converge.
    ``normalize_cost``: divide D by its largest entry first, so that ``reg`` means the same for
    attention costs (large) and hidden-state costs (small), and for costs that shrink in training.
    ``max_iter``: the most Sinkhorn iterations per solve; a small ``reg`` with many tied costs can
    need more (POT warns "Sinkhorn did not converge"; the flow is then further from optimal, but
    its marginals are still exact)."""

    reg: float = bounded(0.1, gt=0)
    normalize_cost: bool = True
    max_iter: int = bounded(1000, gt=0)


def sinkhorn_flow(cost: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor, params: SinkhornParams) -> torch.Tensor:
    """The entropic transport plan (M x N) for cost D (M x N) and layer weights w_s (M), w_t (N).

    Solved by POT in float64 on the CPU through ``kdframe.api.solve_transport``, which hands over
    the detached cost and the weights renormalised onto the simplex, and returns the flow as a
    constant in the cost's dtype and device.
    """
    return solve_transport(cost, (w_s, w_t), lambda d, a, b: _sinkhorn(d, a, b, params))


def _sinkhorn(d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, params: SinkhornParams) -> torch.Tensor:
    # Imported at the first solve, not with the module: every kdframe command (--help included)
    # loads every installed plugin, and POT with torch takes seconds to import.
    import ot
    import torch

    scale = d.abs().max()
    if params.normalize_cost and scale > 0:
        d = d / scale
    # The plain solver is ~8x faster, but its kernel exp(-D / reg) underflows when D / reg is
    # large; the log-domain solver is exact there.
    method = "sinkhorn" if d.abs().max() <= _PLAIN_RANGE * params.reg else "sinkhorn_log"
    flow = ot.sinkhorn(a.numpy(), b.numpy(), d.numpy(), params.reg, method=method, numItermax=params.max_iter)
    return round_to_marginals(torch.from_numpy(flow), a, b)


def round_to_marginals(flow: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A plan with row sums exactly ``a`` and column sums exactly ``b``, close to ``flow`` in L1.

    Sinkhorn stops with its marginals within a threshold, or off by more when it ran out of
    iterations; cost attention divides by the marginals, so they are made exact (Altschuler,
    Weed and Rigollet, 2017, Algorithm 2): scale rows and columns down to at most their weight,
    then spread the missing mass as an outer product of the deficits.
    """
    import torch

    flow = flow * (a / flow.sum(1)).clamp(max=1)[:, None]  # an empty row divides by 0: inf, clamped to 1
    flow = flow * (b / flow.sum(0)).clamp(max=1)[None, :]
    short_a, short_b = (a - flow.sum(1)).clamp_min(0), (b - flow.sum(0)).clamp_min(0)  # >= 0 up to rounding
    missing = short_a.sum()
    return flow + torch.outer(short_a, short_b) / missing if missing > 0 else flow


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add("mapping", "sinkhorn", params=SinkhornParams, keeps_marginals=True,
                 description="entropic optimal transport between layers (Sinkhorn): a dense, smooth EMD")


@hookimpl
def kdframe_layer_mapping(
    kind: str, cost: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], ctx: StageContext
) -> torch.Tensor | None:
    if ctx.mapping is None or ctx.mapping.name != "sinkhorn":
        return None  # another plugin's mapping: answering would shadow it
    return sinkhorn_flow(cost, *weights, ctx.mapping.params)
