"""End-to-end runs on tiny models: run directory contents, kill-and-resume equivalence, export."""

import copy
import errno
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from kdframe.library import run
from kdframe.optim import adamw, param_groups

SMOKE = str(ROOT / "recipes" / "smoke_tiny.toml")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    result = run_cli("run", SMOKE, "--out", str(out), "--progress", "off")
    assert result.returncode == 0, result.stderr
    return out


def test_run_directory_holds_everything(reference_run):
    names = {p.name for p in reference_run.iterdir()}
    assert {"recipe.resolved.toml", "env.json", "metrics.jsonl", "layer_weights.jsonl", "summary.json",
            "checkpoint.pt", "student.pt", "teacher.pt"} <= names
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["main_metric"] == "f1"
    assert set(summary["teacher"]["dev"]) == {"f1", "accuracy"}
    assert summary["student"]["params"] < summary["teacher"]["params"]
    records = read_jsonl(reference_run / "metrics.jsonl")
    train = [r for r in records if r["stage"] == "distil" and "loss" in r]
    evals = [r for r in records if r["stage"] == "distil" and r.get("split") == "dev"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert {"att", "hid", "emb", "pred", "lr"} <= set(train[0])
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    # the last stage's last step is always written, even inside the status file's 2 s throttle
    progress = json.loads((reference_run / "progress.json").read_text())
    assert (progress["label"], progress["step"], progress["total"]) == ("distil", 8, 8)
    assert progress["info"].startswith("loss ") and " dev f1 " in progress["info"]


def test_a_finished_run_keeps_one_copy_of_its_teacher_and_one_checkpoint(reference_run):
    """The cached teacher is linked into the run directory, not copied (a 36-cell grid of a 12-layer
    teacher held 36 copies of 438 MB); the mid-stage checkpoint generation goes once the run is done."""
    source = json.loads((reference_run / "teacher.json").read_text())["source"]
    assert source.startswith("cache ") or source == "fine-tuned in this run"
    cached = (Path(os.environ["KDFRAME_CACHE"]) / "teachers").glob("*.pt")
    assert [p for p in cached if p.samefile(reference_run / "teacher.pt")]
    assert stat.S_IMODE((reference_run / "teacher.pt").stat().st_mode) == 0o444  # a write into it would reach the cache
    assert not (reference_run / "checkpoint.prev.pt").exists()


def test_a_teacher_that_cannot_be_linked_is_written(reference_run, tmp_path, monkeypatch):
    """Where the run directory and the cache are on different filesystems the cached teacher is
    written into the run directory as before, and nothing is left of the link attempt."""
    def cross_device(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    out = tmp_path / "run"
    run(SMOKE, out=str(out), progress="off")
    assert json.loads((out / "teacher.json").read_text())["source"].startswith("cache ")
    assert not (out / "teacher.pt").samefile(reference_run / "teacher.pt")
    written = torch.load(out / "teacher.pt", weights_only=True)
    cached = torch.load(reference_run / "teacher.pt", weights_only=True)
    assert written.keys() == cached.keys() and all(torch.equal(written[k], cached[k]) for k in cached)
    assert not list(out.glob(".*"))


def test_logged_flows_have_the_logged_weights_as_marginals(reference_run):
    for record in read_jsonl(reference_run / "layer_weights.jsonl"):
        flow = torch.tensor(record["flow"], dtype=torch.float64)
        assert torch.allclose(flow.sum(1), torch.tensor(record["student"], dtype=torch.float64), atol=1e-6)
        assert torch.allclose(flow.sum(0), torch.tensor(record["teacher"], dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("kill", ["step:5", "eval:4", "write:6", "step:3 format-1"])
def test_killed_run_resumes_to_the_same_result(reference_run, tmp_path, kill):
    """Killed at a step, an evaluation or inside a checkpoint write; "format-1": the checkpoint
    rewritten as kdframe wrote it before checkpoints had a format version."""
    out = tmp_path / "run"
    killed = run_cli("run", SMOKE, "--out", str(out), "--progress", "off", "-p", "kdframe_test_killer",
                     env={"KDFRAME_TEST_KILL": kill.split()[0]})
    assert killed.returncode == -9, killed.stderr
    assert not (out / "summary.json").exists()
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # the previous checkpoint survived
    assert state["format"] == 3 and state["stage"] == "distil"
    if kill.endswith("format-1"):
        del state["format"]
        del state["position"]["stopped"]  # format 3's
        torch.save(state, out / "checkpoint.pt")
    resumed = run_cli("run", SMOKE, "--resume", str(out), "--progress", "off")
    assert resumed.returncode == 0, resumed.stderr
    expected = json.loads((reference_run / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert got["student"]["best"] == expected["student"]["best"]
    assert got["student"]["final"] == expected["student"]["final"]
    want, have = (torch.load(d / "student.pt", weights_only=True) for d in (reference_run, out))
    assert all(torch.equal(want[k], have[k]) for k in want)
    assert read_jsonl(out / "layer_weights.jsonl") == read_jsonl(reference_run / "layer_weights.jsonl")
    distil = lambda d: [r for r in read_jsonl(d / "metrics.jsonl") if r["stage"] == "distil"]  # noqa: E731
    assert distil(out) == distil(reference_run)


def test_fused_adamw_steps_like_the_for_loop_and_resumes_its_state():
    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    loop_model = copy.deepcopy(fused_model)
    start = [p.detach().clone() for p in loop_model.parameters()]
    fused = adamw([fused_model], 0.01, 1e-2, torch.device("cpu"))
    loop = torch.optim.AdamW(param_groups([loop_model], 0.01), lr=1e-2, foreach=False)
    assert fused.param_groups[0]["fused"]

    def steps(count, pairs):
        for _ in range(count):
            x = torch.randn(4, 8)
            for model, optimizer in pairs:
                optimizer.zero_grad()
                model(x).pow(2).sum().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()

    steps(5, [(fused_model, fused), (loop_model, loop)])
    for p, q, p0 in zip(fused_model.parameters(), loop_model.parameters(), start):
        assert not torch.allclose(q, p0)
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # a checkpoint written before the optimizer was fused holds the for-loop's state (and its
    # settings, which load_state_dict restores): it resumes. deepcopy: a loaded checkpoint shares no
    # tensors with the optimizer that wrote it.
    resumed_model = copy.deepcopy(loop_model)
    resumed = adamw([resumed_model], 0.01, 1e-2, torch.device("cpu"))
    resumed.load_state_dict(copy.deepcopy(loop.state_dict()))
    steps(3, [(resumed_model, resumed), (loop_model, loop)])
    for p, q in zip(resumed_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_progress_in_a_log_file_is_plain_lines(tmp_path):
    """Default progress with stderr going to a pipe (a log file, a scheduler): the run directory,
    then a line per log_every steps with the rate, from the first steps on."""
    result = run_cli("run", SMOKE, "--out", str(tmp_path / "run"), "--set", "stages[0].epochs=1",
                     env={"KDFRAME_CACHE": str(tmp_path / "cache")})  # the teacher is fine-tuned, not cached
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"run directory: {(tmp_path / 'run').resolve()}"
    assert re.search(r"^\[teacher \(random init from config\)\] step 8/8 loss [\d.]+ .*\([\d.]+ steps/s\)$",
                     result.stderr, re.M), result.stderr
    assert re.search(r"^\[distil\] step 2/4 loss [\d.]+ dev f1 [\d.]+ \([\d.]+ steps/s, ~\d+ s left\)$",
                     result.stderr, re.M), result.stderr
    assert "[distil] step 4/4" in result.stderr and not any("\x1b" in line for line in lines)  # no terminal codes


def test_resumed_run_records_what_an_unbroken_one_does(tmp_path):
    """Killed after step 5 of 8 (0.4 s a step, kdframe_robust_slow): the resumed run says where its
    teacher came from, as the first session did, and times the whole stage and run, not the
    resumed part (the checkpoint at step 4 holds 4 steps' time)."""
    out = tmp_path / "run"
    env = {"KDFRAME_TEST_KILL": "step:5", "KDFRAME_ROBUST_SLOW": "0.4"}
    plugins = ["-p", "kdframe_test_killer", "-p", "kdframe_robust_slow"]
    killed = run_cli("run", SMOKE, "--out", str(out), "--progress", "off", *plugins, env=env)
    assert killed.returncode == -9, killed.stderr
    first = json.loads((out / "teacher.json").read_text())["source"]
    assert first == "fine-tuned in this run" or first.startswith("cache ")
    resumed = run_cli("run", SMOKE, "--resume", str(out), "--progress", "off", *plugins, env={"KDFRAME_ROBUST_SLOW": "0.4"})
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["source"] == first
    stage = summary["stages"]["distil"]
    assert stage["wall_time_s"] >= 8 * 0.4 and stage["steps_per_s"] <= 8 / (8 * 0.4)
    assert summary["wall_time_s"] >= stage["wall_time_s"]


def test_checkpoint_of_a_newer_format_is_refused(reference_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**state, "format": 99}, run / "checkpoint.pt")
    result = run_cli("run", SMOKE, "--resume", str(run), "--progress", "off")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"checkpoint {run / 'checkpoint.pt'} cannot be resumed (format 99, this kdframe reads formats 1 to 3:" \
           " update kdframe)" in result.stderr


def test_resume_accepts_the_recipe_as_an_earlier_kdframe_wrote_it(reference_run, tmp_path):
    """Resolved recipes are compared structured: one written before [data] had a source key (and
    with a default key left out) means the same recipe."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    stored = run / "recipe.resolved.toml"
    text = stored.read_text()
    assert 'source = "glue"\n' in text and "train_limit = 64\n" in text
    stored.write_text(text.replace('source = "glue"\n', "").replace("cache_dir = \"\"\n", ""))
    result = run_cli("run", SMOKE, "--resume", str(run), "--progress", "off")
    assert result.returncode == 0, result.stderr


def test_resume_refuses_a_run_of_another_recipe(reference_run):
    result = run_cli("run", SMOKE, "--resume", str(reference_run), "--set", "stages[0].lr=0.5", "--progress", "off")
    assert result.returncode == 2
    assert "different recipe" in result.stderr and "Traceback" not in result.stderr


def test_a_run_directory_in_use_is_refused_and_freed_when_its_holder_dies(tmp_path):
    """Two processes on one run would interleave checkpoints and logs: while a run trains, a
    second one there is refused (exit 2, naming the first's pid); once the first is killed (no
    chance to clean up), the directory is free and resumes."""
    import signal
    import time

    from conftest import FIXTURES

    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "kdframe.cli", "run", SMOKE, "--out", str(run_dir),
                              "--progress", "off", "-p", "kdframe_robust_slow"], cwd=ROOT, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(FIXTURES), "KDFRAME_ROBUST_SLOW": "5"})
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()
        second = run_cli("run", SMOKE, "--resume", str(run_dir), "--progress", "off")
        assert first.poll() is None  # it was still training while the second was refused
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert f"{run_dir} is in use by another kdframe process (pid {first.pid} on " in second.stderr
    assert "--progress off -p kdframe_robust_slow" in second.stderr  # the holder's command line
    resumed = run_cli("run", SMOKE, "--resume", str(run_dir), "--progress", "off")
    assert resumed.returncode == 0, resumed.stderr


def test_a_lock_file_removed_by_its_ending_holder_is_not_held_by_the_next(tmp_path, monkeypatch):
    """The race removing the lock file leaves: a newcomer opens it, the holder ends (removes it,
    releases it), the newcomer locks the removed file. It must take the file now at the path
    instead, or a third process could lock that one and run beside it."""
    import fcntl

    from kdframe import fileio

    lock = tmp_path / ".kdframe.lock"
    holder = fileio.exclusive_use(lock)
    holder.__enter__()
    lock_file = fcntl.flock
    ended = []

    def flock_once_the_holder_ended(handle, operation):
        if not ended:  # between the newcomer's open and its flock
            ended.append(holder.__exit__(None, None, None))
        return lock_file(handle, operation)

    monkeypatch.setattr(fcntl, "flock", flock_once_the_holder_ended)
    with fileio.exclusive_use(lock):
        assert ended and f"pid {os.getpid()} on " in lock.read_text()
        with open(lock) as third, pytest.raises(BlockingIOError):
            lock_file(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not lock.exists()


def test_out_on_a_non_empty_run_directory_is_refused(reference_run):
    result = run_cli("run", SMOKE, "--out", str(reference_run), "--progress", "off")
    assert result.returncode == 2 and "use --resume" in result.stderr


def test_export_loads_without_kdframe(reference_run, tmp_path):
    out = tmp_path / "exported"
    result = run_cli("export", str(reference_run), str(out))
    assert result.returncode == 0, result.stderr
    code = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForSequenceClassification.from_pretrained({str(out)!r})\n"
        "assert not any(k.startswith('kdframe') for k in sys.modules)\n"
        "assert not any('W_h' in k for k in m.state_dict())\n"
        f"p = transformers.pipeline('text-classification', model={str(out)!r})\n"
        "assert p.tokenizer.model_max_length == 48, p.tokenizer.model_max_length  # the recipe's max_length\n"
        "assert p('the cat sat')[0]['label'] in ('not_equivalent', 'equivalent')  # MRPC's labels, not LABEL_0\n"
        "print(m.config.num_hidden_layers, sum(p.numel() for p in m.parameters()))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    layers, params = loaded.stdout.split()
    summary = json.loads((reference_run / "summary.json").read_text())
    assert int(layers) == 2 and int(params) == summary["student"]["params"]


def test_teacher_cache_key_follows_the_data_content_not_its_location(tmp_path):
    import shutil

    import attrs

    from conftest import bundled_host, read_recipe
    from kdframe.caches import teacher_key

    host = bundled_host()
    recipe = read_recipe(SMOKE).recipe

    def key(glue_dir):
        data = attrs.evolve(recipe.data, params=attrs.evolve(recipe.data.params, glue_dir=str(glue_dir)))
        return teacher_key(attrs.evolve(recipe, data=data), host.data_fingerprint(data))

    copies = [tmp_path / "a", tmp_path / "b"]
    for copy in copies:
        shutil.copytree(ROOT / "data" / "glue" / "MRPC", copy / "MRPC")
    assert key(copies[0]) == key(copies[1])  # a moved or copied checkout keeps its teachers
    dev = copies[1] / "MRPC" / "dev.tsv"
    dev.write_text(dev.read_text().replace("\n1\t", "\n0\t", 1))  # one label changed
    assert key(copies[0]) != key(copies[1])  # an edited file gets a new teacher, not a stale one
    assert len({key(""), key(copies[0])}) == 2  # the hub's data is named, not read
