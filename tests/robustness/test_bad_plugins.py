"""Bad plugins: load-time problems exit 2 naming the plugin; a NaN loss term during training is a
run failure (exit 1) naming the term and the step, and never reaches a checkpoint."""

import json

import pytest
import torch
from robust_helpers import SMOKE, all_finite, assert_bad_input, kd


def test_plugin_that_fails_at_import():
    assert_bad_input(kd("validate", SMOKE, "-p", "kdframe_test_broken_import"),
                     "plugin 'kdframe_test_broken_import' (-p) failed to import",
                     "RuntimeError: this plugin is broken on purpose")


def test_plugin_that_does_not_exist():
    assert_bad_input(kd("validate", SMOKE, "-p", "kdframe_no_such_plugin"),
                     "plugin 'kdframe_no_such_plugin' (-p) failed to import: ModuleNotFoundError")


def test_plugin_registering_a_taken_strategy_name():
    result = kd("validate", SMOKE, "-p", "kdframe_test_taken")
    assert_bad_input(result, "mapping strategy 'emd' is registered by two plugins", "block it with -p no:NAME")
    assert "'emd'" in result.err and "'kdframe_test_taken'" in result.err


def test_plugin_with_a_misspelled_hook():
    assert_bad_input(kd("validate", SMOKE, "-p", "kdframe_test_misspelled"),
                     "plugin 'kdframe_test_misspelled' implements a hook kdframe does not define",
                     "kdframe_layer_maping")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_mapping_hook_returning_the_wrong_shape(tmp_path, command):
    """Caught by the dry-run step: `run` fails before the run directory and the teacher's training."""
    out = tmp_path / "run"
    extra = ["--out", out, "--progress", "off"] if command == "run" else []
    result = kd(command, SMOKE, "-p", "kdframe_robust_wrong_shape", *extra,
                "--set", 'stages[0].mapping.strategy="robust-wrong-shape"')
    assert_bad_input(result, "stages[0]: mapping 'robust-wrong-shape' (plugin 'kdframe_robust_wrong_shape')",
                     "shape (2, 5)", "expected shape (2, 4)", out=out)
    assert not out.exists()


# -- NaN loss terms during training (in-process runs: 4 distillation steps) ---------------------

NAN_RUN = ["--progress", "off", "-p", "kdframe_robust_nan", "--set", "stages[0].losses.robust_nan=1.0",
           "--set", "stages[0].epochs=1"]


@pytest.mark.parametrize("step", [1, 3])
def test_nan_loss_term_stops_the_run_before_any_nan_checkpoint(tmp_path, step):
    out = tmp_path / "run"
    # A cache of its own: the teacher stage runs whatever tests ran before in this process.
    result = kd("run", SMOKE, "--out", out, *NAN_RUN,
                env={"KDFRAME_ROBUST_NAN": str(step), "KDFRAME_CACHE": str(tmp_path / "cache")})
    assert result.rc == 1, result.err
    assert "Traceback" not in result.err
    assert f"stage 'distil' step {step}: non-finite loss term 'robust_nan'" in result.err
    assert 'nonfinite = "skip"' in result.err
    assert not (out / "summary.json").exists() and not (out / "student.pt").exists()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all_finite(state)
    if step == 1:  # no distillation step finished: the checkpoint is the teacher stage's
        assert state["stage"] == "teacher"
    else:  # the last good checkpoint, at step 2
        assert state["stage"] == "distil" and state["position"]["step"] == step - 1
    for name in ("teacher.pt", "best-distil.pt"):
        if (out / name).exists():
            assert all_finite(torch.load(out / name, weights_only=True))


def test_nan_loss_term_with_skip_completes_and_counts_skipped_steps(tmp_path):
    out = tmp_path / "run"
    result = kd("run", SMOKE, "--out", out, *NAN_RUN, "--set", 'stages[0].nonfinite="skip"',
                env={"KDFRAME_ROBUST_NAN": "1,3"})
    assert result.rc == 0, result.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["distil"]["skipped_steps"] == 2
    assert summary["stages"]["distil"]["steps"] == 4
    for name in ("student.pt", "checkpoint.pt"):
        assert all_finite(torch.load(out / name, weights_only=True))
