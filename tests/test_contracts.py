"""kdframe.testing's contract checks: every registered strategy keeps them (the bundled ones, and
the third-party example examples/kdframe-sinkhorn), and each check catches the bug it is for."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import torch

from conftest import ROOT
from kdframe.api import Strategy, bounded, hookimpl
from kdframe.plugins import PluginHost, load_plugins
from kdframe.testing import (
    check_loss_term,
    check_mapping,
    check_params_roundtrip,
    check_state_roundtrip,
    check_weighting,
    make_context,
)

# The bundled plugins and the third-party example, from this repository's source whether or not it
# is installed: the checks hold for the plugin the docs hold up as a model.
sys.path.insert(0, str(ROOT / "examples" / "kdframe-sinkhorn"))
HOST = load_plugins(["kdframe_sinkhorn"])


def strategies(*slots: str) -> list[Any]:
    return [pytest.param(s, id=f"{s.slot}:{s.name}") for s in HOST.registry.all() if s.slot in slots]


def started_context(host: PluginHost, strategy: Strategy):
    """A context with ``strategy`` chosen, after extra parameters and stage start, as in training."""
    slot, name = strategy.slot, strategy.name
    ctx = make_context(host, 2, 4, mapping=name if slot == "mapping" else "emd",
                       weighting=name if slot == "weighting" else None,
                       losses={name: {}} if slot == "loss" else {"hid": {}})
    host.extra_parameters(ctx)
    host.stage_start(ctx)
    return ctx


# -- every registered strategy ---------------------------------------------------------------------

@pytest.mark.parametrize("strategy", strategies("mapping", "weighting", "loss"))
def test_params_roundtrip(strategy: Strategy) -> None:
    check_params_roundtrip(strategy)


@pytest.mark.parametrize("strategy", strategies("mapping"))
def test_mapping(strategy: Strategy) -> None:
    check_mapping(HOST, strategy.name)


@pytest.mark.parametrize("strategy", strategies("weighting"))
def test_weighting(strategy: Strategy) -> None:
    check_weighting(HOST, strategy.name)


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
@pytest.mark.parametrize("strategy", strategies("loss"))
def test_loss_term(strategy: Strategy, regression: bool) -> None:
    check_loss_term(HOST, strategy.name, regression=regression)


@pytest.mark.parametrize("strategy", strategies("mapping", "weighting", "loss"))
def test_state_roundtrip(strategy: Strategy) -> None:
    check_state_roundtrip(HOST, started_context(HOST, strategy))


def test_the_example_is_among_them() -> None:
    assert HOST.registry.get("mapping", "sinkhorn").plugin == "kdframe_sinkhorn"


# -- each check catches its bug ------------------------------------------------------------------

def strategy_with(params: type) -> Strategy:
    return Strategy(slot="mapping", name="broken", params=params, plugin="inline")


@attrs.frozen
class RequiredField:
    scale: float


@attrs.frozen
class DefaultOutOfBounds:
    scale: float = bounded(0.0, gt=0)


@attrs.frozen
class NoneDefault:
    cap: float | None = None


@pytest.mark.parametrize(("params", "problem"), [
    (RequiredField, "give every field a default"),
    (DefaultOutOfBounds, "scale: must be > 0"),
    (NoneDefault, "cannot be written in a recipe"),
])
def test_params_check_catches(params: type, problem: str) -> None:
    with pytest.raises(AssertionError, match=problem):
        check_params_roundtrip(strategy_with(params))


class InlineMapping:
    """A mapping ``broken`` whose flow is ``flow(cost, w_s, w_t)``."""

    def __init__(self, flow: Callable[..., torch.Tensor], keeps_marginals: bool = True, only_own: bool = True):
        self.flow, self.keeps_marginals, self.only_own = flow, keeps_marginals, only_own

    @hookimpl
    def kdframe_register(self, registry):
        registry.add("mapping", "broken", keeps_marginals=self.keeps_marginals)

    @hookimpl
    def kdframe_layer_mapping(self, kind, cost, weights, ctx):
        if self.only_own and ctx.mapping.name != "broken":
            return None
        return self.flow(cost, *weights)


def outer(cost: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    return torch.outer(w_s, w_t).to(cost.dtype)


@pytest.mark.parametrize(("mapping", "name", "problem"), [
    (InlineMapping(outer, only_own=False), "emd", r"plugins \['InlineMapping', 'emd'\] all answered"),
    (InlineMapping(lambda c, s, t: outer(c, s, t) + 0 * c), "broken", "must be detached"),
    (InlineMapping(lambda c, s, t: torch.outer(s, t)), "broken", "float64 cost.*flow is torch.float32"),
    (InlineMapping(lambda c, s, t: outer(c, s, t) - c.detach()), "broken", "negative flow entries"),
    (InlineMapping(lambda c, s, t: outer(c, s, t) * c.detach().sum() / c.detach().sum()), "broken",
     "all zero cost.*non-finite flow"),
    (InlineMapping(lambda c, s, t: torch.full_like(c.detach(), 1 / c.numel())), "broken",
     "skewed weights.*row sums .* are off the weights"),
    (InlineMapping(lambda c, s, t: outer(c, s, t)[:, :1]), "broken", "flow shape"),
])
def test_mapping_check_catches(make_host, mapping: InlineMapping, name: str, problem: str) -> None:
    with pytest.raises(AssertionError, match=problem):
        check_mapping(make_host(mapping), name)


def test_mapping_check_spares_marginals_not_promised(make_host) -> None:
    check_mapping(make_host(InlineMapping(lambda c, s, t: torch.full_like(c.detach(), 1 / c.numel()),
                                          keeps_marginals=False)), "broken")


class InlineWeighting:
    """A weighting ``broken`` whose update of one side is ``update(w, moved)`` (moved: the
    transported cost per layer)."""

    def __init__(self, update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.update = update

    @hookimpl
    def kdframe_register(self, registry):
        registry.add("weighting", "broken")

    @hookimpl
    def kdframe_update_layer_weights(self, flows, costs, weights, ctx):
        if ctx.weighting.name != "broken":
            return None
        moved = {kind: flows[kind] * costs[kind] for kind in flows}
        return {kind: (self.update(w_s, moved[kind].sum(1)), self.update(w_t, moved[kind].sum(0)))
                for kind, (w_s, w_t) in weights.items()}


@pytest.mark.parametrize(("update", "problem"), [
    (lambda w, moved: w * 2, "weights sum to 2"),
    (lambda w, moved: w * moved.sum() / moved.sum(), "all-zero costs.*non-finite weights"),
    (lambda w, moved: torch.softmax(-moved * 100, 0), "strictly positive"),
    (lambda w, moved: w.double(), "expected torch.float32"),
    (lambda w, moved: w[1:], r"shape \(\d+,\), expected"),
])
def test_weighting_check_catches(make_host, update: Callable, problem: str) -> None:
    with pytest.raises(AssertionError, match=problem):
        check_weighting(make_host(InlineWeighting(update)), "broken")


class InlineLoss:
    """A loss term ``broken`` whose value is ``term(student)``; ``also`` adds terms not asked for."""

    def __init__(self, term: Callable[[Any], torch.Tensor], also: tuple[str, ...] = (),
                 needs: tuple[str, ...] = ("logits",)):
        self.term, self.also, self.needs = term, also, needs

    @hookimpl
    def kdframe_register(self, registry):
        registry.add("loss", "broken", needs=self.needs)

    @hookimpl
    def kdframe_loss_terms(self, student, teacher, costs, flows, batch, ctx):
        if not ctx.active("broken"):
            return {}
        value = self.term(student)
        return {"broken": value, **{name: value for name in self.also}}


@pytest.mark.parametrize(("loss", "problem"), [
    (InlineLoss(lambda s: s.logits.detach().sum()), "detached from the student"),
    (InlineLoss(lambda s: s.logits.sum(0)), "expected a scalar tensor"),
    (InlineLoss(lambda s: s.logits.sum() * float("nan")), "non-finite value"),
    (InlineLoss(lambda s: s.logits.sum(), also=("spare",)), r"only the active term, got \['broken', 'spare'\]"),
    (InlineLoss(lambda s: s.logits.sum() * 0), "no gradient reaches the student's features"),
    # Declares [CLS] vectors only but reads the second token: the engine hands it the first position alone.
    (InlineLoss(lambda s: s.hidden[-1][:, 1].sum(), needs=("cls",)), "IndexError: index 1 is out of bounds"),
])
def test_loss_check_catches(make_host, loss: InlineLoss, problem: str) -> None:
    with pytest.raises(AssertionError, match=problem):
        check_loss_term(make_host(loss), "broken")


class InlineState:
    """Keeps ``ctx.state["steps"]`` in checkpoints under ``key``; ``restores`` whether it loads it back."""

    def __init__(self, restores: bool = True, key: str = "inline.steps"):
        self.restores, self.key = restores, key

    @hookimpl
    def kdframe_state_dict(self, ctx):
        return {self.key: ctx.state.get("steps")}

    @hookimpl
    def kdframe_load_state_dict(self, ctx, state):
        if self.restores:
            ctx.state["steps"] = state[self.key]


class OtherState(InlineState):
    """A second plugin (plugins are named by class)."""


def stepped_context(host: PluginHost, steps: Any):
    ctx = make_context(host, losses={"hard": {}})
    ctx.state["steps"] = steps
    return ctx


def test_state_check_passes_real_state(make_host) -> None:
    host = make_host(InlineState())
    state = check_state_roundtrip(host, stepped_context(host, torch.tensor([5, 7])))
    assert torch.equal(state["inline.steps"], torch.tensor([5, 7]))


@pytest.mark.parametrize(("plugins", "steps", "problem"), [
    ((InlineState(restores=False),), torch.tensor(5), "state after a resume differs"),
    ((InlineState(),), object(), "does not load with weights_only=True"),
    ((InlineState(), OtherState()), torch.tensor(5), r"plugins '\w+State', '\w+State' both returned 'inline.steps'"),
])
def test_state_check_catches(make_host, plugins: tuple, steps: Any, problem: str) -> None:
    host = make_host(*plugins)
    with pytest.raises(AssertionError, match=problem):
        check_state_roundtrip(host, stepped_context(host, steps))
