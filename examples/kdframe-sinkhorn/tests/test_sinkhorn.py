"""The sinkhorn mapping: kdframe's plugin contracts, then what makes it Sinkhorn (it tends to
EMD as reg shrinks and to the uniform flow as reg grows; a normalised cost makes reg scale-free)."""

from __future__ import annotations

import ot
import pytest
import torch

import kdframe_sinkhorn as sinkhorn
from kdframe.api import RecipeError
from kdframe.testing import (
    check_mapping,
    check_params_roundtrip,
    check_state_roundtrip,
    make_context,
    plugin_host,
    random_weights,
)


@pytest.fixture(scope="module")
def host():
    return plugin_host("kdframe_sinkhorn")  # installed, or importable from PYTHONPATH


def flow_of(cost: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], **params: object) -> torch.Tensor:
    return sinkhorn.sinkhorn_flow(cost, *weights, sinkhorn.SinkhornParams(**params))


# -- the contracts every kdframe mapping keeps --------------------------------------------------

def test_params_roundtrip(host) -> None:
    check_params_roundtrip(host.registry.get("mapping", "sinkhorn"))


# Small reg, raw costs and a cut-short solve do not converge: the flow must keep the marginals anyway.
@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
@pytest.mark.parametrize("params", [None, {"reg": 0.01}, {"reg": 10.0}, {"normalize_cost": False}, {"max_iter": 2}])
def test_mapping_contract(host, params: dict | None) -> None:
    check_mapping(host, "sinkhorn", params)


def test_state_roundtrip(host) -> None:
    check_state_roundtrip(host, make_context(host, 3, 6, mapping="sinkhorn", losses={"hid": {}}))


def test_reg_must_be_positive(host) -> None:
    with pytest.raises(RecipeError, match=r"mapping.reg: must be > 0, got 0"):
        make_context(host, mapping="sinkhorn", mapping_params={"reg": 0})


# -- what makes it Sinkhorn ------------------------------------------------------------------------

COST = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) * 5
WEIGHTS = random_weights(3, 6, torch.Generator().manual_seed(1))


def test_small_reg_tends_to_the_emd_optimum() -> None:
    a, b, d = (x.double().numpy() for x in (*WEIGHTS, COST))
    optimum = ot.emd2(a / a.sum(), b / b.sum(), d)
    for reg, gap in ((0.1, 0.1), (0.01, 1e-3)):  # reg is relative: the cost is normalised
        transported = (flow_of(COST, WEIGHTS, reg=reg).double() * COST.double()).sum().item()
        assert optimum <= transported + 1e-6 and transported - optimum < gap * optimum


def test_large_reg_tends_to_the_uniform_flow() -> None:
    flow = flow_of(COST, WEIGHTS, reg=1e4)
    torch.testing.assert_close(flow, torch.outer(*WEIGHTS), rtol=0, atol=1e-5)


def test_normalised_cost_makes_reg_scale_free() -> None:
    torch.testing.assert_close(flow_of(COST, WEIGHTS), flow_of(COST * 1e3, WEIGHTS), rtol=0, atol=1e-6)
    raw, raw_larger = (flow_of(cost, WEIGHTS, reg=1.0, normalize_cost=False) for cost in (COST, COST * 10))
    assert not torch.allclose(raw, raw_larger, atol=1e-3)  # without it, reg means less as D grows


def test_nonfinite_cost_gives_the_uniform_flow() -> None:
    cost = COST.clone()
    cost[0, 0] = float("nan")
    torch.testing.assert_close(flow_of(cost, WEIGHTS), torch.outer(*WEIGHTS))


def test_answers_only_for_its_own_strategy(host) -> None:
    for other in ("emd", None):
        ctx = make_context(host, 3, 6, mapping=other)
        assert sinkhorn.kdframe_layer_mapping("hid", COST, WEIGHTS, ctx) is None
