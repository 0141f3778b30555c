"""Bad command lines and run directories: --resume and --out misuse, corrupt checkpoints, argparse."""

import os

import pytest
import torch
from robust_helpers import SMOKE, assert_bad_input, assert_no_run_left, kd

from conftest import read_recipe
from kdframe.recipe import to_plain
from kdframe.rundir import RECIPE, recipe_toml


def fake_run(folder, text=None):
    """A run directory as `kdframe run` starts it: the resolved recipe (smoke_tiny's by default)."""
    folder.mkdir(parents=True)
    (folder / RECIPE).write_text(text if text is not None else recipe_toml(to_plain(read_recipe(SMOKE).recipe)))
    return folder


def test_resume_on_a_run_of_another_recipe(tmp_path):
    run = fake_run(tmp_path / "other", recipe_toml(to_plain(read_recipe(SMOKE, "stages[0].lr=0.5").recipe)))
    result = kd("run", SMOKE, "--resume", run, "--progress", "off")
    assert_bad_input(result, f"--resume {run}: the run was made with a different recipe", str(run / RECIPE))
    assert_no_run_left(run)


def test_resume_on_a_directory_that_is_not_a_run(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    assert_bad_input(kd("run", SMOKE, "--resume", folder, "--progress", "off"),
                     f"--resume {folder}: not a kdframe run directory (no {RECIPE})")


def test_resume_on_a_truncated_checkpoint(tmp_path):
    run = fake_run(tmp_path / "run")
    torch.save({"stage": "distil", "stage_index": 0, "model": {"w": torch.randn(4096)}}, run / "checkpoint.pt")
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    result = kd("run", SMOKE, "--resume", run, "--progress", "off")
    assert_bad_input(result, f"checkpoint {run / 'checkpoint.pt'} cannot be loaded", "truncated, corrupt")
    assert "weights_only=False" not in result.err and "weights_only` set to `False" not in result.err
    assert len(result.err.strip().splitlines()) == 1  # one line, not torch's paragraph
    assert not (run / "summary.json").exists() and not (run / "student.pt").exists()


def test_resume_on_a_corrupt_teacher_checkpoint(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "teacher.pt").write_bytes(b"not a checkpoint at all")
    result = kd("run", SMOKE, "--resume", run, "--progress", "off")
    assert_bad_input(result, f"checkpoint {run / 'teacher.pt'} cannot be loaded")
    assert len(result.err.strip().splitlines()) == 1
    assert not (run / "summary.json").exists() and not (run / "student.pt").exists()


def test_out_on_a_directory_of_another_run(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text("")
    assert_bad_input(kd("run", SMOKE, "--out", run, "--progress", "off"), f"--out {run} is not empty", "use --resume")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", RECIPE]


def test_out_on_a_non_empty_directory(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert_bad_input(kd("run", SMOKE, "--out", folder, "--progress", "off"),
                     f"--out {folder} is not empty (choose an empty directory)")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_out_is_a_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    assert_bad_input(kd("run", SMOKE, "--out", path, "--progress", "off"), f"--out {path} exists and is not a directory")
    assert path.read_text() == "x"


def test_out_below_a_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    out = path / "run"
    assert_bad_input(kd("run", SMOKE, "--out", out, "--progress", "off"), f"cannot write to run directory {out}")


def test_out_in_an_unwritable_directory(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: chmod 500 does not stop writes")
        out = parent / "run"
        assert_bad_input(kd("run", SMOKE, "--out", out, "--progress", "off"),
                         f"cannot write to run directory {out}", "Permission denied")
        assert not out.exists()
    finally:
        parent.chmod(0o700)


def test_out_and_resume_together(tmp_path):
    run = fake_run(tmp_path / "run")
    other = tmp_path / "other"
    assert_bad_input(kd("run", SMOKE, "--resume", run, "--out", other, "--progress", "off"),
                     "--out and --resume cannot be used together")
    assert not other.exists()


def test_export_of_a_directory_without_a_finished_run(tmp_path):
    run = fake_run(tmp_path / "run")
    assert_bad_input(kd("export", run, tmp_path / "exported"), f"{run} holds no finished run")
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("args, message", [
    (["trian", str(SMOKE)], "invalid choice: 'trian'"),
    (["validate", str(SMOKE), "--sett", "seed=1"], "unrecognized arguments: --sett"),
    (["run"], "the following arguments are required: recipe"),
    (["run", str(SMOKE), "--progress", "loud"], "argument --progress: invalid choice: 'loud'"),
], ids=["unknown-command", "unknown-flag", "missing-argument", "bad-choice"])
def test_argparse_errors(args, message):
    result = kd(*args)
    assert result.rc == 2, result.err
    assert message in result.err and "usage:" in result.err and "Traceback" not in result.err
