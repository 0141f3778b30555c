"""Control from plugins: a stage ended, evaluated or checkpointed when a plugin asks, and the
bundled early-stopping control, checked against the dev scores of a run without it and across a
kill and resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, run_cli

SMOKE = str(ROOT / "recipes" / "smoke_tiny.toml")
EARLY = "stages[0].controls={early-stopping={patience=2, min_delta=%s}}"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def dev_scores(run):
    return [(r["step"], r["f1"]) for r in read_jsonl(run / "metrics.jsonl")
            if r["stage"] == "distil" and r.get("split") == "dev"]


def expected_stop(scores, patience, min_delta):
    """The step at which early stopping ends the stage, from a run without it (the two runs are the
    same up to that point): the evaluation that makes `patience` in a row without a gain > min_delta."""
    best, stale = None, 0
    for step, value in scores:
        if best is None or value > best + min_delta:
            best, stale = value, 0
        else:
            stale += 1
            if stale == patience:
                return step
    return scores[-1][0]


@pytest.fixture(scope="module")
def unstopped(tmp_path_factory):
    out = tmp_path_factory.mktemp("unstopped") / "run"
    result = run_cli("run", SMOKE, "--out", str(out), "--progress", "off")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped") / "run"
    result = run_cli("run", SMOKE, "--out", str(out), "--progress", "plain", "--set", EARLY % "1.0")
    assert result.returncode == 0, result.stderr
    return out, result.stderr


@pytest.mark.parametrize("min_delta", ["1.0", "0.0"])
def test_early_stopping_stops_at_the_right_evaluation(unstopped, stopped, min_delta, tmp_path):
    if min_delta == "1.0":  # no gain can count: the second evaluation after the first stops it
        out, stderr = stopped
    else:
        out = tmp_path / "run"
        stderr = run_cli("run", SMOKE, "--out", str(out), "--progress", "plain", "--set", EARLY % min_delta).stderr
    want = expected_stop(dev_scores(unstopped), 2, float(min_delta))
    summary = json.loads((out / "summary.json").read_text())["stages"]["distil"]
    assert summary["steps"] == want
    assert dev_scores(out) == dev_scores(unstopped)[:len(dev_scores(out))] and dev_scores(out)[-1][0] == want
    if want < 8:
        assert summary["stopped"].startswith("early stopping: dev f1 has not improved")
        assert f"[distil] stopping at step {want}: early stopping" in stderr
        assert max(r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "distil") == want


def test_early_stopping_resumes_with_its_count(stopped, tmp_path):
    """Killed after the evaluation at step 4 (one without a gain): the resumed run stops at step 6
    too, with the same weights; without its restored count it would run to step 8."""
    reference, _ = stopped
    out = tmp_path / "run"
    killed = run_cli("run", SMOKE, "--out", str(out), "--progress", "off", "--set", EARLY % "1.0",
                     "-p", "kdframe_test_killer", env={"KDFRAME_TEST_KILL": "step:5"})
    assert killed.returncode == -9, killed.stderr
    resumed = run_cli("run", SMOKE, "--resume", str(out), "--progress", "off", "--set", EARLY % "1.0")
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((out / "summary.json").read_text())["stages"]["distil"]
    assert got["steps"] == 6 and got["stopped"].startswith("early stopping")
    want, have = (torch.load(d / "student.pt", weights_only=True) for d in (reference, out))
    assert all(torch.equal(want[k], have[k]) for k in want)


def test_a_stopped_stage_is_not_continued_on_resume(stopped, tmp_path):
    """Killed right after the evaluation that stops the stage: the checkpoint written then says so."""
    out = tmp_path / "run"
    killed = run_cli("run", SMOKE, "--out", str(out), "--progress", "off", "--set", EARLY % "1.0",
                     "-p", "kdframe_test_killer", env={"KDFRAME_TEST_KILL": "write:6"})
    assert killed.returncode == -9
    resumed = run_cli("run", SMOKE, "--resume", str(out), "--progress", "off", "--set", EARLY % "1.0")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["stages"]["distil"]["steps"] == 6


def test_plugins_ask_for_evaluations_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", SMOKE, "--out", str(out), "--progress", "off", "-p", "kdframe_test_control",
                     "-p", "kdframe_test_killer", env={"KDFRAME_TEST_KILL": "step:6"})
    assert result.returncode == -9
    assert [step for step, _ in dev_scores(out)] == [2, 3, 4]  # 3: asked for
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["position"]["step"] == 5  # asked for (checkpoint_every is 2: steps 2 and 4 otherwise)


@pytest.mark.parametrize(("value", "needle"), [
    ("{early-stoping={}}", "stages[0].controls.early-stoping: unknown control strategy 'early-stoping'; known: early-stopping"),
    ("{early-stopping={patience=0}}", "stages[0].controls.early-stopping.patience: must be >= 1, got 0"),
    ("{early-stopping={patiense=2}}", "patiense"),
])
def test_bad_controls_are_bad_input(value, needle, tmp_path):
    result = run_cli("validate", SMOKE, "--set", f"stages[0].controls={value}")
    assert result.returncode == 2 and needle in result.stderr, result.stderr
