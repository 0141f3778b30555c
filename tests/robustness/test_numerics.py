"""Numerics at the edges: zero layer costs through the plugin host, and a bf16 run."""

import json
import math

import pytest
import torch
from robust_helpers import SMOKE, all_finite

from conftest import run_cli
from kdframe.plugins import load_plugins
from kdframe.recipe import structure
from kdframe.types import Selected, StageContext, TaskInfo

M, N = 2, 4


def context(host, weighting_params):
    params, problems = structure(weighting_params, host.registry.get("weighting", "cost-attention").params)
    assert not problems
    return StageContext(
        run_dir=None, stage_index=0, stage=None, task=TaskInfo("mrpc", 2, ("f1",), "f1"),
        student_layers=M, teacher_layers=N, student_hidden_size=32, teacher_hidden_size=32,
        student_heads=4, teacher_heads=4, mapping=Selected("emd", None), weighting=Selected("cost-attention", params),
        losses={}, device=torch.device("cpu"))


@pytest.mark.parametrize("weighting", [{}, {"normalize": "softmax", "temperature": 0.5}, {"separate": True}],
                         ids=["sum", "softmax", "separate"])
def test_cost_attention_with_all_zero_costs_stays_finite(weighting):
    """Zero costs (identical layers, or a dead feature) must not give 0/0 weights, step after step."""
    host = load_plugins()
    ctx = context(host, weighting)
    costs = {"att": torch.zeros(M, N), "hid": torch.zeros(M, N)}
    weights = {kind: (torch.full((M,), 1 / M), torch.full((N,), 1 / N)) for kind in costs}
    for _ in range(5):
        flows = {kind: host.layer_mapping(kind, cost, weights[kind], ctx) for kind, cost in costs.items()}
        for flow in flows.values():
            assert flow.shape == (M, N) and torch.isfinite(flow).all() and (flow >= 0).all()
        weights = host.update_layer_weights(flows, costs, weights, ctx)
        for w_s, w_t in weights.values():
            for w in (w_s, w_t):
                assert torch.isfinite(w).all() and (w > 0).all()
                assert torch.isclose(w.sum(), torch.tensor(1.0), atol=1e-5)


def test_cost_attention_with_zero_flow_and_zero_cost_stays_finite():
    """A flow of zeros (a mapping that moves nothing) with zero cost: still on the simplex."""
    host = load_plugins()
    ctx = context(host, {})
    costs = {"att": torch.zeros(M, N)}
    weights = {"att": (torch.full((M,), 1 / M), torch.full((N,), 1 / N))}
    new = host.update_layer_weights({"att": torch.zeros(M, N)}, costs, weights, ctx)
    assert all_finite(new) and torch.isclose(new["att"][1].sum(), torch.tensor(1.0))


def test_bf16_run_with_masked_attention_stays_finite(tmp_path):
    """smoke_tiny under bf16 autocast: MRPC pairs differ in length, so every batch has padded
    (masked) keys, whose scores must not overflow the squared attention cost."""
    out = tmp_path / "run"
    result = run_cli("run", str(SMOKE), "--out", str(out), "--progress", "off", "--set", 'precision="bf16"',
                     "--set", "teacher.train.max_steps=2", "--set", "stages[0].max_steps=2",  # bf16 is slow on CPUs
                     "--set", "data.train_limit=32", "--set", "data.dev_limit=16")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["stage"] == "distil" and "loss" in r]
    assert train, records
    for record in train:
        for term in ("loss", "att", "hid", "emb", "pred"):
            assert math.isfinite(record[term]), record
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["distil"]["skipped_steps"] == 0
    assert all_finite(torch.load(out / "student.pt", weights_only=True))
