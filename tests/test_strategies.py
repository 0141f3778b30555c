"""The bundled strategies checked against independent truth: an LP solver for EMD, naive loops
over layer pairs for the cost matrices, hand arithmetic for cost attention and the losses, and
the layer lists of the TinyBERT and PKD papers."""

from __future__ import annotations

import math

import attrs
import kdframe_cost_attention as ca
import kdframe_costs as costs
import kdframe_costs.matrices as matrices
import kdframe_emd as emd
import kdframe_losses as losses
import kdframe_pkd as pkd
import kdframe_tinybert as tinybert
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linprog

from kdframe.api import Features, ModelError, StageContext
from kdframe.plugins import load_plugins
from kdframe.recipe import structure
from kdframe.step import DistillStep
from kdframe.testing import MASK, make_context, random_features

HOST = load_plugins()
REGISTRY = HOST.registry


def make_ctx(M: int = 2, N: int = 4, *, d_s: int = 8, d_t: int = 12, **selection) -> StageContext:
    """kdframe.testing's context with this module's host; ``d_s``/``d_t`` are the hidden sizes."""
    return make_context(HOST, M, N, hidden_sizes=(d_s, d_t), **selection)


# -- registration ---------------------------------------------------------------------------

def test_registered_strategies() -> None:
    assert REGISTRY.names("mapping") == ["emd", "one-to-one", "pkd", "uniform"]
    assert REGISTRY.names("weighting") == ["cost-attention", "uniform"]
    assert REGISTRY.names("loss") == ["att", "emb", "hard", "hid", "pred", "pt"]
    assert REGISTRY.get("loss", "att").needs == {"attn"}
    assert REGISTRY.get("loss", "pred").needs == {"logits"}
    assert REGISTRY.get("loss", "hard").student_only
    assert not REGISTRY.get("mapping", "one-to-one").keeps_marginals
    assert not REGISTRY.get("mapping", "pkd").keeps_marginals
    assert REGISTRY.get("mapping", "emd").keeps_marginals


@pytest.mark.parametrize(("slot", "name", "raw", "problem"), [
    ("loss", "att", {"tokens": "padded"}, "tokens: must be one of 'all', 'real'"),
    ("loss", "pred", {"temperature": 0}, "temperature: must be > 0"),
    ("weighting", "cost-attention", {"normalize": "max"}, "normalize: must be one of"),
    ("weighting", "cost-attention", {"temprature": 2}, "unknown key 'temprature'"),
    ("mapping", "pkd", {"choice": "first"}, "choice: must be one of 'skip', 'last'"),
])
def test_params_are_checked(slot: str, name: str, raw: dict, problem: str) -> None:
    _, problems = structure(raw, REGISTRY.get(slot, name).params)
    assert any(problem in p for p in problems), problems


def test_validate_recipe_wants_a_mapping_for_layer_terms() -> None:
    stage = attrs.make_class("Stage", ["losses", "mapping"])
    loss = attrs.make_class("Loss", ["weight"])
    recipe = attrs.make_class("Recipe", ["stages"])([
        stage({"hid": loss(0.01), "att": loss(0.0), "pred": loss(1.0)}, None),
        stage({"hid": loss(0.01)}, object()),
    ])
    assert costs.kdframe_validate_recipe(recipe, REGISTRY) == [
        'stages[0].mapping: loss terms hid need a layer mapping, e.g. mapping = { strategy = "emd" }']


# -- EMD against a linear program ---------------------------------------------------------

def lp_optimum(D: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """min sum F*D subject to F >= 0 and the marginals, by scipy's LP solver."""
    M, N = D.shape
    rows = np.kron(np.eye(M), np.ones(N))  # sum_j F_ij
    cols = np.kron(np.ones(M), np.eye(N))  # sum_i F_ij
    result = linprog(D.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.r_[a, b], bounds=(0, None), method="highs")
    assert result.success
    return result.fun


def cost_cases(M: int, N: int, rng: np.random.Generator) -> list[np.ndarray]:
    random = rng.random((M, N)) * 10
    with_zeros = random * (rng.random((M, N)) < 0.5)
    return [random, with_zeros, np.ones((M, N)), np.zeros((M, N)), np.round(random)]  # ties too


@pytest.mark.parametrize(("M", "N"), [(2, 6), (3, 6), (4, 12), (6, 12)])
def test_emd_flow_is_optimal_with_the_given_marginals(M: int, N: int) -> None:
    rng = np.random.default_rng(M * 100 + N)
    uniform = (torch.full((M,), 1 / M), torch.full((N,), 1 / N))
    skewed = tuple(torch.tensor(x / x.sum(), dtype=torch.float32) for x in (rng.random(M) + 0.05, rng.random(N) + 0.05))
    for w_s, w_t in (uniform, skewed):
        a, b = w_s.double().numpy(), w_t.double().numpy()
        a, b = a / a.sum(), b / b.sum()
        for D in cost_cases(M, N, rng):
            flow = emd.emd_flow(torch.tensor(D), w_s, w_t).numpy()
            assert (flow >= 0).all()
            assert abs((flow * D).sum() - lp_optimum(D, a, b)) < 1e-9
            np.testing.assert_allclose(flow.sum(1), a, rtol=0, atol=1e-9)
            np.testing.assert_allclose(flow.sum(0), b, rtol=0, atol=1e-9)


def test_emd_flow_is_a_constant_like_the_cost() -> None:
    cost = torch.rand(3, 6, requires_grad=True) * 1.0
    flow = emd.emd_flow(cost, torch.full((3,), 1 / 3), torch.full((6,), 1 / 6))
    assert flow.dtype == torch.float32 and flow.device == cost.device and not flow.requires_grad


def test_emd_flow_of_a_nonfinite_cost_is_uniform() -> None:
    cost = torch.tensor([[float("nan"), 1.0], [1.0, 0.0]])
    w = torch.tensor([0.5, 0.5])
    assert torch.equal(emd.emd_flow(cost, w, w), torch.full((2, 2), 0.25))


def test_mapping_hooks_answer_only_for_their_strategy() -> None:
    cost, weights = torch.rand(2, 4), (torch.tensor([0.3, 0.7]), torch.full((4,), 0.25))
    ctx = make_ctx(2, 4, mapping="uniform")
    assert torch.allclose(emd.kdframe_layer_mapping("hid", cost, weights, ctx), torch.outer(*weights))
    assert tinybert.kdframe_layer_mapping("hid", cost, weights, ctx) is None
    assert pkd.kdframe_layer_mapping("hid", cost, weights, ctx) is None
    assert emd.kdframe_layer_mapping("hid", cost, weights, make_ctx(2, 4, mapping="pkd")) is None
    assert emd.kdframe_layer_mapping("hid", cost, weights, make_ctx(2, 4)) is None


# -- cost matrices against naive loops -----------------------------------------------------

def naive_costs(s_layers, t_layers, keep: torch.Tensor | None = None) -> torch.Tensor:
    """D[i, j] by a double loop; ``keep`` (bool) selects the entries averaged."""
    def mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        diff = (s - t) ** 2
        return diff.mean() if keep is None else diff[keep.expand_as(diff)].mean()

    return torch.stack([torch.stack([mse(s, t) for t in t_layers]) for s in s_layers])


def assert_same_values_and_grads(fast: torch.Tensor, slow: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    probe = torch.rand(fast.shape, generator=torch.Generator().manual_seed(7))
    grads_fast = torch.autograd.grad((fast * probe).sum(), inputs, retain_graph=True)
    grads_slow = torch.autograd.grad((slow * probe).sum(), inputs)
    for g_fast, g_slow in zip(grads_fast, grads_slow):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-4, atol=1e-6)


REAL_ATT = MASK[:, None, :, None].bool() & MASK[:, None, None, :].bool()  # (B, 1, L, L)
REAL_HID = MASK[:, :, None].bool()  # (B, L, 1)


@pytest.mark.parametrize("tokens", ["all", "real"])
def test_att_cost_equals_naive_loop(tokens: str) -> None:
    student, teacher = random_features(3, 8, 4, seed=1, grad=True), random_features(6, 12, 4, seed=2)
    fast = matrices.att_cost(student, teacher, costs.AttParams(tokens=tokens))
    slow = naive_costs(student.attn, teacher.attn, REAL_ATT if tokens == "real" else None)
    assert fast.shape == (3, 6)
    assert_same_values_and_grads(fast, slow, list(student.attn))


def test_costs_stay_accurate_when_layers_are_close() -> None:
    """Where training starts (student = teacher layers) costs are tiny next to the features' norms;
    the ||a||^2 + ||b||^2 - 2ab expansion must not cancel them away."""
    generator = torch.Generator().manual_seed(11)
    teacher = torch.randn(4, 8, 12, 64, 64, generator=generator) * 5  # attention-score magnitudes
    student = teacher[[0, 2]] + 1e-2 * torch.randn(2, 8, 12, 64, 64, generator=generator)
    fast = matrices.pairwise_mse(student, teacher)
    slow = naive_costs(student.double(), teacher.double()).float()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-9)
    assert fast[0, 0] < 2e-4 and fast[1, 2] < 2e-4  # ~1e-4 true cost, not swamped by rounding


def test_att_cost_all_tokens_is_the_reference_code() -> None:
    """TinyBERT/BERT-EMD: scores with the additive mask, entries <= -100 set to 0, MSE per pair."""
    student, teacher = random_features(2, 8, 4, seed=3), random_features(4, 12, 4, seed=4)
    additive = (1 - MASK[:, None, None, :].float()) * -10000.0

    def reference(a: torch.Tensor) -> torch.Tensor:
        a = a + additive
        return torch.where(a <= -1e2, torch.zeros_like(a), a)

    expected = torch.tensor([[F.mse_loss(reference(s), reference(t)).item() for t in teacher.attn] for s in student.attn])
    torch.testing.assert_close(matrices.att_cost(student, teacher, costs.AttParams()), expected, rtol=1e-5, atol=1e-5)


def test_padding_adds_nothing_to_att_cost_with_real_tokens() -> None:
    student, teacher = random_features(2, 8, 4, seed=5), random_features(4, 12, 4, seed=6)
    pad_rows = ~MASK[:, None, :, None].bool() & MASK[:, None, None, :].bool()  # padded queries, real keys
    # Only the student's padded rows change (the same change on both sides would cancel).
    noisy = Features(student.logits, student.mask, student.hidden, tuple(a + 50.0 * pad_rows for a in student.attn))
    real, all_tokens = costs.AttParams(tokens="real"), costs.AttParams()
    torch.testing.assert_close(matrices.att_cost(noisy, teacher, real), matrices.att_cost(student, teacher, real))
    assert not torch.allclose(matrices.att_cost(noisy, teacher, all_tokens), matrices.att_cost(student, teacher, all_tokens))


def test_costs_stay_float32_under_autocast() -> None:
    student, teacher = random_features(2, 8, 2, seed=17), random_features(4, 12, 2, seed=18)
    plain = matrices.att_cost(student, teacher, costs.AttParams())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = matrices.att_cost(student, teacher, costs.AttParams())
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


def test_att_heads_must_match_unless_averaged() -> None:
    student, teacher = random_features(2, 8, 2, seed=7, grad=True), random_features(4, 12, 4, seed=8)
    with pytest.raises(ModelError, match=r"student has 2 attention heads and the teacher 4.*average_heads = true"):
        matrices.att_cost(student, teacher, costs.AttParams())
    with pytest.raises(ModelError, match="student has 2 attention heads and the teacher 4"):
        costs.kdframe_stage_start(make_ctx(losses={"att": {}}, heads=(2, 4)))  # before training
    costs.kdframe_stage_start(make_ctx(losses={"att": {"average_heads": True}}, heads=(2, 4)))
    fast = matrices.att_cost(student, teacher, costs.AttParams(average_heads=True))
    slow = naive_costs([a.mean(1) for a in student.attn], [a.mean(1) for a in teacher.attn])
    assert_same_values_and_grads(fast, slow, list(student.attn))


@pytest.mark.parametrize("tokens", ["all", "real"])
def test_hid_cost_equals_naive_loop(tokens: str) -> None:
    student, teacher = random_features(3, 8, 2, seed=9, grad=True), random_features(6, 12, 2, seed=10)
    proj = torch.nn.Linear(8, 12)
    fast = matrices.hid_cost(student, teacher, proj, costs.HiddenParams(tokens=tokens))
    slow = naive_costs([proj(h) for h in student.hidden[1:]], teacher.hidden[1:], REAL_HID if tokens == "real" else None)
    assert_same_values_and_grads(fast, slow, [*student.hidden[1:], proj.weight, proj.bias])


@pytest.mark.parametrize("d_s", [8, 12])
def test_cls_cost_equals_naive_loop(d_s: int) -> None:
    student, teacher = random_features(3, d_s, 2, seed=11, grad=True), random_features(6, 12, 2, seed=12)
    proj = torch.nn.Linear(d_s, 12) if d_s != 12 else None
    project = proj if proj is not None else (lambda x: x)
    fast = matrices.cls_cost(student, teacher, proj)
    slow = naive_costs([F.normalize(project(h[:, 0]), dim=-1) for h in student.hidden[1:]],
                       [F.normalize(h[:, 0], dim=-1) for h in teacher.hidden[1:]])
    params = [proj.weight, proj.bias] if proj is not None else []
    assert_same_values_and_grads(fast, slow, [*student.hidden[1:], *params])


# -- the costs plugin through its hooks ---------------------------------------------------

def test_costs_and_terms_follow_the_active_losses() -> None:
    ctx = make_ctx(2, 4, losses={"hid": {}, "emb": {"tokens": "real"}})
    extra = costs.kdframe_extra_parameters(ctx)
    w_h = extra[costs.W_H]
    assert isinstance(w_h, torch.nn.Linear) and (w_h.in_features, w_h.out_features) == (8, 12)
    student, teacher = random_features(2, 8, 2, seed=13, grad=True), random_features(4, 12, 2, seed=14)
    found = costs.kdframe_layer_costs(student, teacher, ctx, lambda kind, m, n: None)
    assert set(found) == {"hid"}
    flows = {"hid": torch.rand(2, 4)}
    terms = costs.kdframe_loss_terms(student, teacher, found, flows, {}, ctx)
    assert set(terms) == {"hid", "emb"}
    torch.testing.assert_close(terms["hid"], (flows["hid"] * found["hid"]).sum())
    diff = (w_h(student.hidden[0]) - teacher.hidden[0]) ** 2
    torch.testing.assert_close(terms["emb"], diff[REAL_HID.expand_as(diff)].mean())
    terms["hid"].backward()
    assert w_h.weight.grad is not None  # the module handed to the engine is the one trained


@pytest.mark.parametrize(("mapping", "terms", "d_s"), [
    ("emd", {"att": {}, "hid": {"tokens": "real"}}, 8), ("one-to-one", {"att": {"tokens": "real"}, "hid": {}}, 8),
    ("pkd", {"pt": {}}, 8), ("pkd", {"pt": {}}, 12)])
def test_the_step_computes_only_the_pairs_it_uses_with_the_full_graphs_loss_and_gradients(
        mapping: str, terms: dict, d_s: int) -> None:
    """The step as it runs (a sparse mapping: the grid without autograd and the terms again on the
    flow's pairs; a fixed one: its pairs only) against the full graph's sum(F * D) on the full
    grid: the same loss and gradients, to 1e-6."""
    ctx = make_ctx(3, 6, mapping=mapping, losses=terms, d_s=d_s)
    assert ctx.sparse_flow
    full = attrs.evolve(ctx, sparse_flow=False)  # shares ctx.state: the same W_h
    extra = costs.kdframe_extra_parameters(ctx)
    teacher = random_features(6, 12, 2, seed=22)
    weights = {kind: (torch.full((3,), 1 / 3), torch.full((6,), 1 / 6)) for kind in ("att", "hid", "cls")}
    results = []
    for as_run in (True, False):
        student = random_features(3, d_s, 2, seed=21, grad=True)
        if as_run:
            out = DistillStep(HOST, ctx).from_features(student, teacher, {}, weights)
            loss, flows = out.loss, out.flows
        else:
            found = HOST.layer_costs(student, teacher, full)
            assert all(cost.requires_grad for cost in found.values())
            flows = {kind: HOST.layer_mapping(kind, cost, weights[kind], full) for kind, cost in found.items()}
            loss = sum(HOST.loss_terms(student, teacher, found, flows, {}, full).values())
        assert all((flow != 0).sum() < flow.numel() for flow in flows.values())  # some pairs carry nothing
        inputs = [*student.hidden, *student.attn, *(m.weight for m in extra.values())]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        results.append((loss, [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]))
    (loss_run, grads_run), (loss_full, grads_full) = results
    torch.testing.assert_close(loss_run, loss_full, rtol=1e-6, atol=0)
    for got, expected in zip(grads_run, grads_full):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mapping", ["one-to-one", "pkd"])
def test_a_fixed_mapping_s_costs_are_its_pairs_only(mapping: str) -> None:
    ctx = make_ctx(3, 6, mapping=mapping, losses={"att": {}, "hid": {}, "pt": {}})
    costs.kdframe_extra_parameters(ctx)
    student, teacher = random_features(3, 8, 2, seed=23, grad=True), random_features(6, 12, 2, seed=24)
    step = DistillStep(HOST, ctx)
    found = HOST.layer_costs(student, teacher, ctx, step.planned_pairs)
    full = HOST.layer_costs(student, teacher, ctx)
    for kind, cost in found.items():
        plan = step.planned_pairs(kind, 3, 6)
        assert 0 < plan.sum() < 18 and not cost.requires_grad  # the loss reads the pairs themselves
        torch.testing.assert_close(cost[plan], full[kind][plan], rtol=0, atol=0)  # the same values, bit for bit
        assert (cost[~plan] == 0).all()


def test_w_h_only_when_needed() -> None:
    assert costs.kdframe_extra_parameters(make_ctx(losses={"att": {}, "pred": {}})) == {}
    assert costs.kdframe_extra_parameters(make_ctx(losses={"pt": {}}, d_s=12, d_t=12)) == {}
    assert set(costs.kdframe_extra_parameters(make_ctx(losses={"pt": {}}, d_s=8, d_t=12))) == {costs.W_H}
    assert set(costs.kdframe_extra_parameters(make_ctx(losses={"emb": {}}, d_s=12, d_t=12))) == {costs.W_H}


def test_pt_term_is_the_mean_over_pkd_pairs() -> None:
    """PKD: [CLS] of student layers 1..M-1 and the skip teacher layers, normalised, one MSE."""
    ctx = make_ctx(3, 6, losses={"pt": {}}, mapping="pkd", d_s=12)
    student, teacher = random_features(3, 12, 2, seed=15), random_features(6, 12, 2, seed=16)
    found = costs.kdframe_layer_costs(student, teacher, ctx, lambda kind, m, n: None)
    flows = {"cls": pkd.kdframe_layer_mapping("cls", found["cls"], (None, None), ctx)}
    term = costs.kdframe_loss_terms(student, teacher, found, flows, {}, ctx)["pt"]
    s = torch.stack([F.normalize(student.hidden[m][:, 0], dim=-1) for m in (1, 2)])
    t = torch.stack([F.normalize(teacher.hidden[n][:, 0], dim=-1) for n in (2, 4)])
    torch.testing.assert_close(term, F.mse_loss(s, t))


# -- one-to-one (TinyBERT) and PKD ------------------------------------------------------------

@pytest.mark.parametrize(("N", "M", "expected"), [
    (12, 4, [3, 6, 9, 12]), (12, 6, [2, 4, 6, 8, 10, 12]), (6, 3, [2, 4, 6]), (6, 2, [3, 6]),
])
def test_one_to_one_is_tinybert_rule(N: int, M: int, expected: list[int]) -> None:
    assert tinybert.teacher_layers_for(M, N, []) == expected
    ctx = make_ctx(M, N, mapping="one-to-one")
    flow = tinybert.kdframe_layer_mapping("att", torch.rand(M, N), (None, None), ctx)
    assert torch.equal(flow.sum(1), torch.ones(M))
    assert [int(row.argmax()) + 1 for row in flow] == expected
    assert set(flow.unique().tolist()) == {0.0, 1.0}


def test_one_to_one_rejects_uneven_depths_without_a_list() -> None:
    with pytest.raises(ValueError, match=r"N=6, M=4.*layers = \[2, 3, 5, 6\]"):
        tinybert.teacher_layers_for(4, 6, [])
    ctx = make_ctx(4, 6, mapping="one-to-one")
    with pytest.raises(ModelError, match="one-to-one.*N=6, M=4"):
        tinybert.kdframe_stage_start(ctx)
    assert tinybert.teacher_layers_for(4, 6, [2, 3, 5, 6]) == [2, 3, 5, 6]
    with pytest.raises(ValueError, match="3 entries, 4 are needed"):
        tinybert.teacher_layers_for(4, 6, [1, 2, 3])
    with pytest.raises(ValueError, match=r"\[7\] are outside the teacher's layers 1..6"):
        tinybert.teacher_layers_for(4, 6, [1, 2, 3, 7])


@pytest.mark.parametrize(("N", "M", "choice", "expected"), [
    (12, 6, "skip", [2, 4, 6, 8, 10]), (12, 6, "last", [7, 8, 9, 10, 11]),
    (12, 3, "skip", [4, 8]), (12, 3, "last", [10, 11]),
])
def test_pkd_picks_the_documented_layers(N: int, M: int, choice: str, expected: list[int]) -> None:
    assert pkd.pkd_teacher_layers(M, N, choice, []) == expected
    ctx = make_ctx(M, N, mapping="pkd", mapping_params={"choice": choice})
    flow = pkd.kdframe_layer_mapping("cls", torch.rand(M, N), (None, None), ctx)
    pairs = [(i + 1, j + 1) for i, j in flow.nonzero().tolist()]
    assert pairs == list(zip(range(1, M), expected))
    assert torch.allclose(flow[flow > 0], torch.tensor(1 / (M - 1)))
    assert flow[-1].sum() == 0  # the last student layer is left to the prediction loss


def test_pkd_rejects_impossible_layouts() -> None:
    with pytest.raises(ValueError, match=r'N=12, M=5.*choice = "last"'):
        pkd.pkd_teacher_layers(5, 12, "skip", [])
    assert pkd.pkd_teacher_layers(5, 12, "last", []) == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="N=4, M=6"):
        pkd.pkd_teacher_layers(6, 4, "last", [])
    with pytest.raises(ValueError, match="at least 2 layers"):
        pkd.pkd_teacher_layers(1, 12, "skip", [])
    assert pkd.pkd_teacher_layers(3, 12, "skip", [1, 12]) == [1, 12]
    with pytest.raises(ModelError, match="mapping pkd: .*N=12, M=5"):
        pkd.kdframe_stage_start(make_ctx(5, 12, mapping="pkd"))


# -- cost attention by hand ----------------------------------------------------------------

# att: F*D = [[1, 1, 0], [0, 1, 4]]  -> c_s = [2, 5], c_t = [1, 2, 4]
#      ratio_s = c_s / 0.5 = [4, 10], score_s = 14 / ratio_s = [3.5, 1.4]
#      ratio_t = c_t / (1/3) = [3, 6, 12], score_t = 21 / ratio_t = [7, 3.5, 1.75]
# hid: F*D = [[1, 2, 3], [1, 2, 3]] -> c_s = [6, 6], c_t = [2, 4, 6]
#      ratio_s = [12, 12], score_s = [2, 2]; ratio_t = [6, 12, 18], score_t = [6, 3, 2]
W = (torch.tensor([0.5, 0.5]), torch.full((3,), 1 / 3))
FLOWS = {"att": torch.tensor([[1 / 3, 1 / 6, 0], [0, 1 / 6, 1 / 3]]), "hid": torch.full((2, 3), 1 / 6)}
COSTS = {"att": torch.tensor([[3.0, 6.0, 9.0], [1.0, 6.0, 12.0]]), "hid": torch.tensor([[6.0, 12, 18], [6, 12, 18]])}
SCORES = {"att": ([3.5, 1.4], [7, 3.5, 1.75]), "hid": ([2, 2], [6, 3, 2])}


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def update(normalize: str, separate: bool, temperature: float = 1.0) -> dict:
    ctx = make_ctx(2, 3, mapping="emd", weighting="cost-attention",
                   weighting_params={"normalize": normalize, "separate": separate, "temperature": temperature})
    return ca.kdframe_update_layer_weights(FLOWS, COSTS, {"att": W, "hid": W}, ctx)


def assert_weights(got: tuple[torch.Tensor, torch.Tensor], student: list[float], teacher: list[float]) -> None:
    torch.testing.assert_close(got[0], torch.tensor(student), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[1], torch.tensor(teacher), rtol=1e-6, atol=1e-7)


def test_cost_attention_sum_by_hand() -> None:
    new = update("sum", separate=True)
    assert_weights(new["att"], [5 / 7, 2 / 7], [4 / 7, 2 / 7, 1 / 7])  # score / sum(score)
    assert_weights(new["hid"], [1 / 2, 1 / 2], [6 / 11, 3 / 11, 2 / 11])
    new = update("sum", separate=False)
    average = ([17 / 28, 11 / 28], [86 / 154, 43 / 154, 25 / 154])  # (att + hid) / 2
    assert_weights(new["att"], *average)
    assert_weights(new["hid"], *average)


def test_cost_attention_softmax_by_hand() -> None:
    T = 2.0
    each = {kind: ([x / T for x in s], [x / T for x in t]) for kind, (s, t) in SCORES.items()}
    new = update("softmax", separate=True, temperature=T)
    for kind, (s, t) in each.items():  # the reference's second softmax applies to separate weights too
        assert_weights(new[kind], softmax(softmax(s)), softmax(softmax(t)))
    new = update("softmax", separate=False, temperature=T)
    mean_s = [(a + b) / 2 for a, b in zip(softmax(each["att"][0]), softmax(each["hid"][0]))]
    mean_t = [(a + b) / 2 for a, b in zip(softmax(each["att"][1]), softmax(each["hid"][1]))]
    for kind in ("att", "hid"):
        assert_weights(new[kind], softmax(mean_s), softmax(mean_t))  # second, plain softmax


@pytest.mark.parametrize(("single_kind", "teacher"), [
    ("own", [6 / 11, 3 / 11, 2 / 11]),
    ("half-step", [(6 / 11 + 1 / 3) / 2, (3 / 11 + 1 / 3) / 2, (2 / 11 + 1 / 3) / 2])])  # with the off kind's uniform
def test_cost_attention_with_one_cost_kind_by_hand(single_kind: str, teacher: list[float]) -> None:
    ctx = make_ctx(2, 3, mapping="emd", weighting="cost-attention", weighting_params={"single_kind": single_kind})
    new = ca.kdframe_update_layer_weights(FLOWS, COSTS, {"hid": W}, ctx)
    assert_weights(new["hid"], [1 / 2, 1 / 2], teacher)


@pytest.mark.parametrize("normalize", ["sum", "softmax"])
def test_cost_attention_stays_finite_with_zero_or_nan_costs(normalize: str) -> None:
    ctx = make_ctx(2, 3, mapping="emd", weighting="cost-attention", weighting_params={"normalize": normalize})
    zero = {"att": torch.zeros(2, 3), "hid": torch.zeros(2, 3)}
    new = ca.kdframe_update_layer_weights(FLOWS, zero, {"att": W, "hid": W}, ctx)
    for w_s, w_t in new.values():
        assert_weights((w_s, w_t), [0.5, 0.5], [1 / 3] * 3)  # nothing transported: no preference
    nan = {"att": torch.full((2, 3), float("nan")), "hid": COSTS["hid"]}
    for w in ca.kdframe_update_layer_weights(FLOWS, nan, {"att": W, "hid": W}, ctx)["att"]:
        assert torch.isfinite(w).all() and (w > 0).all() and torch.isclose(w.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("mapping", ["emd", "uniform", "one-to-one", "pkd"])
@pytest.mark.parametrize("normalize", ["sum", "softmax"])
def test_cost_attention_weights_stay_on_the_simplex(mapping: str, normalize: str) -> None:
    gen = torch.Generator().manual_seed(0)
    ctx = make_ctx(4, 12, mapping=mapping, weighting="cost-attention", weighting_params={"normalize": normalize})
    weights = {kind: (torch.full((4,), 0.25), torch.full((12,), 1 / 12)) for kind in ("att", "hid")}
    for _ in range(20):
        found = {kind: torch.rand(4, 12, generator=gen) * 10 for kind in weights}
        flows = {kind: HOST.layer_mapping(kind, cost, weights[kind], ctx) for kind, cost in found.items()}
        weights = HOST.update_layer_weights(flows, found, weights, ctx)
        for w in (w for pair in weights.values() for w in pair):
            assert torch.isfinite(w).all() and (w > 0).all() and w.dtype == torch.float32
            assert abs(w.double().sum().item() - 1) < 1e-6


def test_uniform_weighting_keeps_the_weights() -> None:
    weights = {"att": W}
    assert ca.kdframe_update_layer_weights(FLOWS, COSTS, weights, make_ctx(weighting="uniform", mapping="emd")) == weights
    assert ca.kdframe_update_layer_weights(FLOWS, COSTS, weights, make_ctx(mapping="emd")) is None


# -- prediction and hard-label losses --------------------------------------------------------

Z_S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
Z_T = [[2.0, 0.0, 1.0], [1.0, 1.0, -1.0]]


def soft_ce_by_hand(T: float) -> float:
    """mean over batch and classes of -p_T(c) log p_S(c), with p = softmax(z / T)."""
    total = 0.0
    for zs, zt in zip(Z_S, Z_T):
        log_norm = math.log(sum(math.exp(z / T) for z in zs))
        teacher_norm = sum(math.exp(z / T) for z in zt)
        total += sum(-(math.exp(t / T) / teacher_norm) * (s / T - log_norm) for s, t in zip(zs, zt))
    return total / (len(Z_S) * len(Z_S[0]))


@pytest.mark.parametrize(("target", "expected"), [("teacher", ((1 - 3) ** 2 + (2 - 1) ** 2) / 2),
                                                   ("gold", ((1 - 4) ** 2 + (2 - 0.5) ** 2) / 2)])
def test_pred_loss_on_regression_fits_the_teacher_or_the_gold_score(target: str, expected: float) -> None:
    ctx = make_ctx(losses={"pred": {"regression_target": target}}, regression=True)
    student, teacher = Features(torch.tensor([[1.0], [2.0]]), MASK), Features(torch.tensor([[3.0], [1.0]]), MASK)
    term = losses.kdframe_loss_terms(student, teacher, {}, {}, {"labels": torch.tensor([4.0, 0.5])}, ctx)
    assert term["pred"].item() == pytest.approx(expected)


@pytest.mark.parametrize(("T", "t2"), [(1.0, True), (2.0, True), (2.0, False)])
def test_pred_loss_by_hand(T: float, t2: bool) -> None:
    ctx = make_ctx(losses={"pred": {"temperature": T, "t2": t2}})
    student = Features(torch.tensor(Z_S), MASK)
    teacher = Features(torch.tensor(Z_T), MASK)
    term = losses.kdframe_loss_terms(student, teacher, {}, {}, {}, ctx)
    expected = soft_ce_by_hand(T) * (T * T if t2 else 1.0)
    assert set(term) == {"pred"} and abs(term["pred"].item() - expected) < 1e-6


def test_regression_losses_are_mse() -> None:
    ctx = make_ctx(losses={"pred": {"temperature": 3.0}, "hard": {}}, regression=True)
    student, teacher = Features(torch.tensor([1.0, 2.0]), MASK), Features(torch.tensor([0.0, 4.0]), MASK)
    terms = losses.kdframe_loss_terms(student, teacher, {}, {}, {"labels": torch.tensor([1.5, 2.0])}, ctx)
    assert terms["pred"].item() == pytest.approx((1 + 4) / 2)
    assert terms["hard"].item() == pytest.approx(0.25 / 2)


def test_hard_loss_is_cross_entropy_with_gold_labels() -> None:
    ctx = make_ctx(losses={"hard": {}})
    labels = torch.tensor([2, 0])
    terms = losses.kdframe_loss_terms(Features(torch.tensor(Z_S), MASK), None, {}, {}, {"labels": labels}, ctx)
    by_hand = sum(math.log(sum(math.exp(z) for z in zs)) - zs[y] for zs, y in zip(Z_S, labels.tolist())) / 2
    assert set(terms) == {"hard"} and terms["hard"].item() == pytest.approx(by_hand)


# -- one training step as the engine runs it ----------------------------------------------------

@pytest.mark.parametrize(("mapping", "weighting", "terms"), [
    ("emd", "cost-attention", {"att": {}, "hid": {}, "emb": {}, "pred": {}}),
    ("uniform", "uniform", {"att": {"tokens": "real"}, "hid": {"tokens": "real"}, "pred": {}}),
    ("one-to-one", None, {"att": {}, "hid": {}, "emb": {}, "pred": {"t2": False}}),
    ("pkd", None, {"pt": {}, "pred": {"temperature": 5.0}, "hard": {}}),
])
def test_one_engine_step(mapping: str, weighting: str | None, terms: dict) -> None:
    """kdframe.step's forward on random features through every bundled hook: the terms asked for,
    the weighted loss, gradients into the student and W_h, and (with cost attention) new weights."""
    M, N = 2, 4
    ctx = make_ctx(M, N, losses=terms, mapping=mapping, weighting=weighting)
    extra = HOST.extra_parameters(ctx)
    HOST.stage_start(ctx)
    student, teacher = random_features(M, 8, 2, seed=20, grad=True), random_features(N, 12, 2, seed=21)
    out = DistillStep(HOST, ctx).from_features(student, teacher, {"labels": torch.tensor([0, 1, 1])}, {})
    assert set(out.terms) == set(terms)
    assert torch.equal(out.loss, sum(ctx.losses[name].weight * out.terms[name].float() for name in ctx.losses))
    uniform = {kind: (torch.full((M,), 1 / M), torch.full((N,), 1 / N)) for kind in out.flows}
    assert all(torch.equal(out.weights[k][i], uniform[k][i]) for k in uniform for i in (0, 1))
    changed = any(not torch.equal(out.next_weights[k][i], uniform[k][i]) for k in uniform for i in (0, 1))
    assert changed == (weighting == "cost-attention")
    out.loss.backward()
    grads = [h.grad for h in student.hidden if h.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for module in extra.values():
        assert module.weight.grad is not None
