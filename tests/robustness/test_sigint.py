"""Ctrl-C (SIGINT) or SIGTERM (what schedulers, Ray, Kubernetes and ``timeout`` send) during
training: exit 130 or 143, a resume hint, a loadable checkpoint; --resume finishes the run."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from robust_helpers import SMOKE, all_finite

from conftest import FIXTURES, ROOT


def distil_started(metrics):
    if not metrics.exists():
        return False
    for line in metrics.read_text().splitlines():
        try:
            if json.loads(line).get("stage") == "distil":
                return True
        except json.JSONDecodeError:
            continue  # a line being written
    return False


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_checkpoints_and_resume_completes(tmp_path, signum, code):
    out = tmp_path / "run"
    steps = tmp_path / "steps.txt"
    env = dict(os.environ, PYTHONPATH=str(FIXTURES), KDFRAME_ROBUST_SLOW="0.5", KDFRAME_ROBUST_STEPS=str(steps))
    process = subprocess.Popen(
        [sys.executable, "-m", "kdframe.cli", "run", str(SMOKE), "--out", str(out), "--progress", "off",
         "-p", "kdframe_robust_slow", "--set", "stages[0].lr=2e-3"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not distil_started(out / "metrics.jsonl"):  # the first distillation record: step 2 of 8
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert "interrupted at distil step" in stderr and f"--resume {out}" in stderr
    hint = shlex.split(stderr.split("Resume with:", 1)[1].strip().splitlines()[0])
    assert not (out / "summary.json").exists()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["stage"] == "distil" and 2 <= state["position"]["step"] < 8
    assert all_finite(state)
    stopped = state["position"]["step"]

    # the hint, followed to the letter, from another directory (it names this interpreter's kdframe,
    # needs no activated environment, and carries the --set and -p options the run was made with)
    assert hint[:4] == [sys.executable, "-m", "kdframe.cli", "run"] and "--set" in hint and "-p" in hint
    resumed = subprocess.run([*hint, "--progress", "off"], cwd=tmp_path, capture_output=True, text=True,
                             env=dict(env, KDFRAME_ROBUST_SLOW="0"))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["distil"]["steps"] == 8
    # each step ran once, and plugins saw the right step number after the resume
    seen = [int(s) for s in steps.read_text().split()]
    assert seen == list(range(1, 9)), f"stopped at {stopped}: {seen}"
