"""Test helpers for kdframe and its plugin authors. (The fixtures ``kdframe_host`` and
``make_host`` come from ``kdframe.pytest_plugin``, which pytest loads in any environment where
kdframe is installed; this module, with torch, only where a test imports it.)

Contract checks: plain functions that call a strategy through its hooks, exactly as the engine
does, and raise ``AssertionError`` naming the case that broke. Call them from any test::

    from kdframe.testing import check_mapping, check_params_roundtrip, plugin_host

    def test_contract():
        host = plugin_host("kdframe_mymap")
        check_params_roundtrip(host.registry.get("mapping", "mymap"))
        check_mapping(host, "mymap")

``check_params_roundtrip``, ``check_mapping``, ``check_weighting``, ``check_loss_term`` and
``check_state_roundtrip`` are the contracts; ``plugin_host``, ``make_context``,
``random_features`` and ``random_weights`` build what they need and serve your own tests too.
"""

from __future__ import annotations

import io
import pickle
import tomllib
from collections.abc import Iterable
from typing import Any

import attrs
import tomli_w
import torch

from kdframe.errors import PluginError, RecipeError
from kdframe.plugins import PluginHost, load_plugins
from kdframe.recipe import Stage, converter, structure
from kdframe.registry import Strategy
from kdframe.step import DistillStep
from kdframe.types import Features, Selected, StageContext, TaskInfo, as_needed

Weights = tuple[torch.Tensor, torch.Tensor]

#: (student layers M, teacher layers N) the checks try: N a multiple of M, as fixed mappings need.
SIZES: tuple[tuple[int, int], ...] = ((2, 6), (3, 6), (4, 12))
#: Three sequences of 5, 3 and 2 real tokens, so that padding is always exercised.
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
#: Marginal tolerance of an exact mapping: float32 sums of up to a dozen entries.
EXACT_MARGINALS = 1e-6


# -- builders ---------------------------------------------------------------------------------

def plugin_host(module: str) -> PluginHost:
    """The installed plugins plus ``module``, a plugin package that is installed or only importable
    (e.g. on PYTHONPATH while you develop it)."""
    host = load_plugins()
    if any(info.module == module for info in host.infos):
        return host  # already an entry point: ``-p`` would register it a second time
    return load_plugins([module])


def make_context(
    host: PluginHost,
    student_layers: int = 2,
    teacher_layers: int = 4,
    *,
    mapping: str | None = None,
    mapping_params: dict[str, Any] | None = None,
    weighting: str | None = None,
    weighting_params: dict[str, Any] | None = None,
    losses: dict[str, dict[str, Any]] | None = None,
    regression: bool = False,
    hidden_sizes: tuple[int, int] = (8, 12),
    heads: tuple[int, int] = (2, 2),
) -> StageContext:
    """A StageContext as the engine builds it for one stage.

    Strategy params are raw recipe tables, structured and checked as a recipe's are (a problem
    raises RecipeError); ``losses`` maps each active term to its params, all with weight 1.
    ``hidden_sizes`` and ``heads`` are (student, teacher).
    """
    problems: list[str] = []

    def select(slot: str, name: str, raw: dict[str, Any] | None, path: str) -> Selected:
        params, found = structure(raw or {}, host.registry.get(slot, name).params, root=f"$.{path}")
        problems.extend(found)
        return Selected(name, params)

    selected = {
        "mapping": select("mapping", mapping, mapping_params, "mapping") if mapping else None,
        "weighting": select("weighting", weighting, weighting_params, "weighting") if weighting else None,
        "losses": {name: select("loss", name, raw, f"losses.{name}") for name, raw in (losses or {}).items()},
    }
    if problems:
        raise RecipeError(problems)
    task = TaskInfo("regression" if regression else "pairs", 1 if regression else 2, ("accuracy",), "accuracy")
    sparse_flow = selected["mapping"] is not None and host.registry.get("mapping", mapping).sparse_flow
    return StageContext(
        run_dir=None, stage_index=0, stage=Stage(), task=task, sparse_flow=sparse_flow,
        student_layers=student_layers, teacher_layers=teacher_layers,
        student_hidden_size=hidden_sizes[0], teacher_hidden_size=hidden_sizes[1],
        student_heads=heads[0], teacher_heads=heads[1], device=torch.device("cpu"), **selected,
    )


def random_features(layers: int, hidden_size: int, heads: int, *, seed: int = 0, grad: bool = False,
                    num_labels: int = 2, mask: torch.Tensor = MASK) -> Features:
    """Features of one forward pass with random values: hidden states (embedding + ``layers``),
    pre-softmax attention scores with masked keys set to 0, and logits. ``grad`` makes every
    tensor a leaf that requires grad (the student's side)."""
    gen = torch.Generator().manual_seed(seed)
    batch, length = mask.shape
    hidden = tuple(torch.randn(batch, length, hidden_size, generator=gen).requires_grad_(grad)
                   for _ in range(layers + 1))
    keys = mask[:, None, None, :].bool()
    attn = tuple((torch.randn(batch, heads, length, length, generator=gen) * 3 * keys).requires_grad_(grad)
                 for _ in range(layers))
    logits = torch.randn(batch, num_labels, generator=gen).requires_grad_(grad)
    return Features(logits=logits, mask=mask, hidden=hidden, attn=attn)


def random_weights(m: int, n: int, gen: torch.Generator | None = None) -> Weights:
    """Layer weights (student m, teacher n) on the simplex: uniform, or skewed when ``gen`` is given."""
    if gen is None:
        return torch.full((m,), 1.0 / m), torch.full((n,), 1.0 / n)
    w_s, w_t = torch.rand(m, generator=gen) + 0.05, torch.rand(n, generator=gen) + 0.05
    return w_s / w_s.sum(), w_t / w_t.sum()


def _random_costs(m: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Cost matrices that break careless solvers: zeros, ties, a large scale, float64."""
    random = torch.rand(m, n, generator=gen) * 10
    return {
        "random": random,
        "with zeros": random * (torch.rand(m, n, generator=gen) < 0.5),
        "all ties": torch.ones(m, n),
        "all zero": torch.zeros(m, n),
        "rounded (ties)": random.round(),
        "large scale": random * 1e4,
        "float64": random.double(),
    }


def _batch(num_labels: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """A collated batch matching MASK, as the engine passes it to ``kdframe_loss_terms``."""
    gen = torch.Generator().manual_seed(seed)
    size = MASK.shape[0]
    labels = torch.rand(size, generator=gen) if num_labels == 1 else torch.randint(num_labels, (size,), generator=gen)
    return {"input_ids": torch.randint(100, MASK.shape, generator=gen) * MASK, "attention_mask": MASK, "labels": labels}


# -- checks -----------------------------------------------------------------------------------

def _expect(condition: Any, message: str) -> None:
    # An explicit raise, not ``assert``: checks must hold under ``python -O`` too.
    if not condition:
        raise AssertionError(message)


def _only_answer(host: PluginHost, hook: str, where: str, **kwargs: Any) -> Any:
    """The one non-None answer to a firstresult hook; two answers mean a plugin ignores the
    strategy name in ``ctx`` and would shadow another plugin's strategy."""
    answers = [(plugin, result) for plugin, result in host.answers_by_plugin(hook, **kwargs) if result is not None]
    _expect(answers, f"{where}: no plugin answered {hook}")
    _expect(len(answers) == 1, f"{where}: plugins {[p for p, _ in answers]} all answered {hook};"
                               " answer only for your own strategy name")
    return answers[0][1]


def _check_on_simplex(w: Any, size: int, like: torch.Tensor, where: str) -> None:
    _expect(isinstance(w, torch.Tensor), f"{where}: expected a tensor, got {type(w).__name__}")
    _expect(w.shape == (size,), f"{where}: shape {tuple(w.shape)}, expected ({size},)")
    _expect(w.dtype == like.dtype and w.device == like.device,
            f"{where}: {w.dtype} on {w.device}, expected {like.dtype} on {like.device} like the input")
    _expect(torch.isfinite(w).all(), f"{where}: non-finite weights {w.tolist()}")
    _expect((w > 0).all(), f"{where}: weights must be strictly positive, got {w.tolist()}")
    total = w.double().sum().item()
    _expect(abs(total - 1) <= 1e-5, f"{where}: weights sum to {total}, not 1")


def check_params_roundtrip(strategy: Strategy) -> None:
    """The params class works as a recipe table: a strategy named alone gets its defaults, the
    defaults written to TOML and structured back are equal (bounds included), and an unknown
    key is rejected with its name."""
    where = f"{strategy.slot} {strategy.name!r} params {strategy.params.__name__}"
    defaults, problems = structure({}, strategy.params)
    _expect(not problems, f"{where}: naming the strategy without params fails: {problems}; give every field a default")
    try:
        written = tomllib.loads(tomli_w.dumps({"params": converter.unstructure(defaults)}))["params"]
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{where}: the defaults cannot be written in a recipe (TOML): {exc}") from None
    back, problems = structure(written, strategy.params)
    _expect(not problems, f"{where}: the defaults written as a recipe table are rejected: {problems}")
    _expect(back == defaults, f"{where}: the defaults came back as {back!r}, not {defaults!r}")
    _, problems = structure({**written, "no_such_key": 1}, strategy.params)
    _expect(any("unknown key 'no_such_key'" in p for p in problems),
            f"{where}: an unknown key is not rejected (problems: {problems}); use attrs classes, not dicts")


def check_mapping(host: PluginHost, name: str, params: dict[str, Any] | None = None,
                  sizes: Iterable[tuple[int, int]] = SIZES, tol: float = EXACT_MARGINALS) -> None:
    """The mapping ``name`` answers alone, with a detached, finite, non-negative flow of the cost's
    shape, dtype and device, for random costs (with zeros, ties, a large scale, float64) and uniform
    and skewed weights; with ``keeps_marginals`` its row and column sums equal the weights within
    ``tol``."""
    strategy = host.registry.get("mapping", name)
    gen = torch.Generator().manual_seed(0)
    for m, n in sizes:
        ctx = make_context(host, m, n, mapping=name, mapping_params=params)
        host.stage_start(ctx)
        for weights_kind, weights in (("uniform", random_weights(m, n)), ("skewed", random_weights(m, n, gen))):
            for cost_kind, cost in _random_costs(m, n, gen).items():
                where = f"mapping {name!r} ({m}x{n}, {cost_kind} cost, {weights_kind} weights)"
                cost = cost.requires_grad_()  # real costs carry the graph; the flow must not
                flow = _only_answer(host, "kdframe_layer_mapping", where, kind="hid", cost=cost, weights=weights,
                                    ctx=ctx)
                _expect(isinstance(flow, torch.Tensor), f"{where}: expected a tensor, got {type(flow).__name__}")
                _expect(flow.shape == cost.shape, f"{where}: flow shape {tuple(flow.shape)}, cost {tuple(cost.shape)}")
                _expect(flow.dtype == cost.dtype and flow.device == cost.device,
                        f"{where}: flow is {flow.dtype} on {flow.device}, the cost {cost.dtype} on {cost.device}")
                _expect(not flow.requires_grad, f"{where}: the flow must be detached (a constant for backprop)")
                _expect(torch.isfinite(flow).all(), f"{where}: non-finite flow {flow.tolist()}")
                _expect((flow >= 0).all(), f"{where}: negative flow entries {flow.tolist()}")
                if strategy.keeps_marginals:
                    sides = ((1, weights[0], "row sums (student)"), (0, weights[1], "column sums (teacher)"))
                    for axis, w, side in sides:
                        error = (flow.double().sum(axis) - w.double()).abs().max().item()
                        _expect(error <= tol, f"{where}: {side} are off the weights by {error:.3g} > {tol:g}"
                                              " (a mapping that does not keep them says keeps_marginals=False)")


def check_weighting(host: PluginHost, name: str, params: dict[str, Any] | None = None,
                    sizes: Iterable[tuple[int, int]] = SIZES, steps: int = 20) -> None:
    """The weighting ``name`` answers alone and, fed its own output for ``steps`` updates with
    random flows and costs (two cost kinds), returns per kind (student, teacher) weights of the
    right shape, dtype and device that stay finite, strictly positive and on the simplex, also
    after an update with all-zero costs."""
    gen = torch.Generator().manual_seed(1)
    kinds = ("att", "hid")
    for m, n in sizes:
        ctx = make_context(host, m, n, weighting=name, weighting_params=params)
        host.stage_start(ctx)
        weights = dict.fromkeys(kinds, random_weights(m, n))
        for step in range(steps + 1):
            zero = step == steps
            flows = {}
            for kind in kinds:
                flow = torch.rand(m, n, generator=gen) * (torch.rand(m, n, generator=gen) < 0.7)
                flows[kind] = flow / flow.sum().clamp_min(1e-12)
            costs = {kind: torch.zeros(m, n) if zero else torch.rand(m, n, generator=gen) * 10 for kind in kinds}
            where = f"weighting {name!r} ({m}x{n}, update {step + 1}{', all-zero costs' if zero else ''})"
            new = _only_answer(host, "kdframe_update_layer_weights", where, flows=flows, costs=costs,
                               weights=weights, ctx=ctx)
            _expect(isinstance(new, dict) and set(new) == set(kinds),
                    f"{where}: expected weights for kinds {list(kinds)}, got {new!r}")
            for kind, pair in new.items():
                _expect(isinstance(pair, tuple) and len(pair) == 2, f"{where}: {kind}: expected (student, teacher)")
                _check_on_simplex(pair[0], m, weights[kind][0], f"{where}: {kind} student weights")
                _check_on_simplex(pair[1], n, weights[kind][1], f"{where}: {kind} teacher weights")
            weights = new


def check_loss_term(host: PluginHost, name: str, params: dict[str, Any] | None = None, *,
                    mapping: str = "uniform", sizes: Iterable[tuple[int, int]] = ((2, 4),),
                    regression: bool = False) -> None:
    """The loss term ``name``, run through the engine's step (extra parameters, stage start,
    costs, flows by ``mapping``, loss terms) on random features of tiny models with different
    hidden sizes, is the only term returned, a finite scalar, and has a finite gradient that
    reaches the student's features. A ``student_only`` term gets no teacher at all."""
    strategy = host.registry.get("loss", name)
    for m, n in sizes:
        where = f"loss {name!r} ({m}x{n}, {'regression' if regression else 'classification'})"
        ctx = make_context(host, m, n, mapping=mapping, losses={name: params or {}}, regression=regression)
        extra = host.extra_parameters(ctx)
        host.stage_start(ctx)
        labels = 1 if regression else 2
        student = random_features(m, ctx.student_hidden_size, ctx.student_heads, seed=1, grad=True, num_labels=labels)
        teacher = None if strategy.student_only else random_features(
            n, ctx.teacher_hidden_size, ctx.teacher_heads, seed=2, num_labels=labels)
        # Shaped as the engine hands them over (a term that reads cls gets the first position only).
        seen = [None if f is None else as_needed(f, strategy.needs) for f in (student, teacher)]
        try:
            out = DistillStep(host, ctx).from_features(*seen, _batch(labels), {})
        except PluginError as exc:
            raise AssertionError(f"{where}: {exc}") from None
        except (IndexError, RuntimeError) as exc:  # e.g. reading past [CLS] when declaring cls
            raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
        _expect(set(out.terms) == {name}, f"{where}: expected only the active term, got {sorted(out.terms)}")
        term = out.terms[name]
        _expect(isinstance(term, torch.Tensor) and term.dim() == 0, f"{where}: expected a scalar tensor, got {term!r}")
        _expect(torch.isfinite(term), f"{where}: non-finite value {term.item()}")
        _expect(term.requires_grad, f"{where}: the term is detached from the student")
        inputs = [student.logits, *student.hidden, *student.attn]
        trained = [p for module in extra.values() for p in module.parameters()]
        grads = torch.autograd.grad(term, inputs + trained, allow_unused=True)
        _expect(all(torch.isfinite(g).all() for g in grads if g is not None), f"{where}: non-finite gradients")
        _expect(any(g is not None and g.abs().sum() > 0 for g in grads[:len(inputs)]),
                f"{where}: no gradient reaches the student's features")


def _plugin_state(host: PluginHost, ctx: StageContext) -> dict[str, Any]:
    try:
        return host.state_dict(ctx)
    except PluginError as exc:  # a key returned by two plugins, or not a dict
        raise AssertionError(f"kdframe_state_dict: {exc}; prefix the keys with your plugin's name") from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check_state_roundtrip(host: PluginHost, ctx: StageContext) -> dict[str, Any]:
    """Checkpoint state survives a resume: every plugin's ``kdframe_state_dict`` (distinct keys)
    goes through ``torch.save`` and ``torch.load(weights_only=True)``, is loaded into a fresh
    context (extra parameters and stage start run first, as on resume), and that context's state
    equals the saved one. Returns the state."""
    state = _plugin_state(host, ctx)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        loaded = torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AssertionError(f"plugin state does not load with weights_only=True (tensors and plain data"
                             f" only): {str(exc).splitlines()[0]}") from None
    fresh = attrs.evolve(ctx, state={})
    host.extra_parameters(fresh)
    host.stage_start(fresh)
    host.load_state_dict(fresh, loaded)
    restored = _plugin_state(host, fresh)
    _expect(_same(restored, state), f"plugin state after a resume differs: saved {state!r}, restored {restored!r}")
    return state
