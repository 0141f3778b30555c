"""The third-party example examples/kdframe-sinkhorn as a user gets it: installed (CI runs
``pip install ./examples/kdframe-sinkhorn``), found through its entry point, used by a recipe,
blocked by ``-p no:sinkhorn``. The rest of the suite does not load installed plugins; these
tests turn that on for the commands they run (INSTALLED_PLUGINS)."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import INSTALLED_PLUGINS, ROOT, run_cli

EXAMPLE = ROOT / "examples" / "kdframe-sinkhorn"
RECIPE = str(EXAMPLE / "recipes" / "smoke.toml")

pytestmark = pytest.mark.skipif(not importlib.metadata.entry_points(group="kdframe", name="sinkhorn"),
                                reason="kdframe-sinkhorn is not installed (pip install ./examples/kdframe-sinkhorn)")


def test_installed_copy_is_the_example_source():
    import kdframe_sinkhorn

    installed = Path(kdframe_sinkhorn.__file__).read_text()
    assert installed == (EXAMPLE / "kdframe_sinkhorn" / "__init__.py").read_text(), (
        f"{kdframe_sinkhorn.__file__} is stale: pip install ./examples/kdframe-sinkhorn")


def test_the_example_passes_its_own_tests():
    # -n 0: one process (kdframe's pytest options, which it picks up from here, ask for two workers).
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", str(EXAMPLE / "tests")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, **INSTALLED_PLUGINS})
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_plugins_lists_it_as_an_entry_point():
    result = run_cli("plugins", env=INSTALLED_PLUGINS)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if " sinkhorn " in line)
    assert "entry point" in row and "mapping:sinkhorn" in row and "layer_mapping" in row


def test_its_recipe_runs_with_dense_flows(tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", RECIPE, "--out", str(out), "--progress", "off", env=INSTALLED_PLUGINS)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["distil"]["steps"] == 8 and summary["student"]["best"]["f1"] >= 0
    assert "sinkhorn" in {plugin["name"] for plugin in json.loads((out / "env.json").read_text())["plugins"]}
    records = [json.loads(line) for line in (out / "layer_weights.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"att", "hid"}
    for record in records:
        flow = torch.tensor(record["flow"], dtype=torch.float64)
        assert (flow > 0).all()  # entropic transport is dense; an EMD flow has at most M+N-1 non-zeros
        assert torch.allclose(flow.sum(1), torch.tensor(record["student"], dtype=torch.float64), atol=1e-6)
        assert torch.allclose(flow.sum(0), torch.tensor(record["teacher"], dtype=torch.float64), atol=1e-6)


def test_blocked_it_is_gone_and_its_recipe_is_bad_input():
    listed = run_cli("plugins", "-p", "no:sinkhorn", env=INSTALLED_PLUGINS)
    assert listed.returncode == 0 and "sinkhorn" not in listed.stdout
    result = run_cli("validate", RECIPE, "-p", "no:sinkhorn", env=INSTALLED_PLUGINS)
    assert result.returncode == 2
    assert "stages[0].mapping: unknown mapping strategy 'sinkhorn'" in result.stderr
    assert "Traceback" not in result.stderr
