"""[tracking]: TensorBoard event files written by a run and read back, equal to what the run wrote
to metrics.jsonl and layer_weights.jsonl; trackers that cannot run are refused at validate."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, run_cli
from kdframe.tracking import flat_config

SMOKE = str(ROOT / "recipes" / "smoke_tiny.toml")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    base = tmp_path_factory.mktemp("tracked")
    out = base / "run"
    # A cache of its own: the teacher is fine-tuned in this run, whichever tests ran before.
    result = run_cli("run", SMOKE, "--out", str(out), "--progress", "off", "--set", 'tracking.trackers=["tensorboard"]',
                     "--set", 'tracking.run_name="first"', env={"KDFRAME_CACHE": str(base / "cache")})
    assert result.returncode == 0, result.stderr
    [folder] = (out / "tracking" / "smoke_tiny").glob("first")
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return out, events


def scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_every_logged_number_reaches_tensorboard(tracked):
    out, events = tracked
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if r["stage"] == "distil" and "loss" in r]
    dev = [r for r in records if r["stage"] == "distil" and r.get("split") == "dev"]
    for name in ("loss", "lr", "att", "hid", "emb", "pred"):
        assert scalars(events, f"distil/train/{name}") == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in train]
    for metric in ("f1", "accuracy"):
        assert scalars(events, f"distil/dev/{metric}") == [(r["step"], pytest.approx(r[metric], rel=1e-6)) for r in dev]
    teacher = next(r for r in records if r.get("kind") == "teacher")
    assert scalars(events, "teacher/selected/f1") == [(0, pytest.approx(teacher["f1"], rel=1e-6))]
    fine_tuning = [r for r in records if r["stage"] == "teacher" and r.get("split") == "dev" and "kind" not in r]
    assert fine_tuning
    assert scalars(events, "teacher/dev/f1") == [(r["step"], pytest.approx(r["f1"], rel=1e-6)) for r in fine_tuning]
    weights = [r for r in read_jsonl(out / "layer_weights.jsonl") if r["stage"] == "distil" and r["kind"] == "hid"]
    assert scalars(events, "distil/layer_weights/hid/teacher_3") == [
        (r["step"], pytest.approx(r["teacher"][2], rel=1e-6)) for r in weights]
    summary = json.loads((out / "summary.json").read_text())
    assert scalars(events, "summary/student_best/f1") == [(0, pytest.approx(summary["student"]["best"]["f1"], rel=1e-6))]


def test_the_resolved_recipe_is_the_runs_configuration(tracked):
    out, _ = tracked
    [hparams] = (out / "tracking" / "smoke_tiny" / "first").glob("*/hparams.yml")
    text = hparams.read_text()
    assert "stages.0.mapping.strategy: emd" in text and "data.task: mrpc" in text


def test_flat_config():
    assert flat_config({"a": {"b": 1, "c": [1, 2]}, "s": [{"x": True}], "n": None}) == {
        "a.b": 1, "a.c": "[1, 2]", "s.0.x": True, "n": "None"}


@pytest.mark.parametrize(("trackers", "needle"), [
    ('["tensorbord"]', "tracking.trackers[0]: must be one of 'tensorboard', 'wandb'"),
    ('["aim"]', "tracking.trackers: 'aim' needs the package aim (pip install aim)"),
    ('["tensorboard", "tensorboard"]', "tracking.trackers: 'tensorboard' is named twice"),
])
def test_trackers_that_cannot_run_are_bad_input(trackers, needle, tmp_path):
    result = run_cli("validate", SMOKE, "--set", f"tracking.trackers={trackers}")
    assert result.returncode == 2 and needle in result.stderr, result.stderr
