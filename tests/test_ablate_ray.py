"""kdframe ablate --on ray on a local Ray cluster: the same cells, statuses and scores as the local
executor; a killed worker's cell is retried and resumed; a grid moves between the executors through
kills and Ctrl-C and ends as one uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import ray  # noqa: F401  (the test extra installs it: these tests never skip)

from conftest import FIXTURES, ROOT, cli_env, run_cli
from kdframe.cli import main

RECIPES = ROOT / "recipes"
# Cells long enough to be killed in the middle (each checkpoints every 2 of its 80 steps).
LONG_GRID = f"""base = "{RECIPES / 'smoke' / 'emd.toml'}"
name = "long"
set = ["stages[0].epochs=20"]
[axes]
tasks = ["mrpc"]
seeds = [1]
[variants.emd]
[variants.one-to-one]
recipe = "{RECIPES / 'smoke' / 'one_to_one.toml'}"
"""


def state_of(out):
    return json.loads((out / "ablation.json").read_text())


def outcomes(out):
    """Each cell's status and scores, by label."""
    return {(c["task"], c["variant"], c["seed"]): (c["status"], c.get("best"), c.get("final"))
            for c in state_of(out)["cells"]}


def dev_records(run_dir):
    """The student's dev evaluations (a cell fine-tunes the teacher, or reads it from the cache)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "dev" and r.get("stage") != "teacher"]


def start(*args, env, sigint_ignored=False):
    """The CLI in a session of its own (killpg reaches the local Ray cluster it starts too);
    ``sigint_ignored``: started as a shell's background job is, with SIGINT ignored."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen([sys.executable, "-m", "kdframe.cli", *args], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(FIXTURES), **env}, preexec_fn=ignore,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.05)
    return False


def checkpoint_time(out, variant):
    path = out / "cells" / "mrpc" / variant / "seed1" / "checkpoint.pt"
    return path.stat().st_mtime_ns if path.exists() else None


def checkpointed_mid_cell(out, variant="emd", before=None):
    """The cell has a checkpoint newer than ``before`` and is not done: a kill now lands in the
    middle of its training."""
    run = out / "cells" / "mrpc" / variant / "seed1"
    return checkpoint_time(out, variant) not in (None, before) and not (run / "summary.json").exists()


@pytest.fixture(scope="module")
def long_grid(tmp_path_factory):
    """LONG_GRID, and its outcome under the local executor (the truth the Ray runs must equal)."""
    grid = tmp_path_factory.mktemp("long") / "grid.toml"
    grid.write_text(LONG_GRID)
    out = grid.parent / "local"
    result = run_cli("ablate", str(grid), "--out", str(out), "--progress", "off", env=cli_env(tmp_path_factory))
    assert result.returncode == 0, result.stderr
    return grid, out


def test_smoke_grid_on_ray_equals_the_local_executor(smoke_ablation, tmp_path, tmp_path_factory):
    local_result, local = smoke_ablation
    assert local_result.returncode == 0, local_result.stderr
    out = tmp_path / "ray"
    # A cache of its own: the grid's one teacher is fine-tuned on the cluster, once.
    env = {**cli_env(tmp_path_factory), "KDFRAME_CACHE": str(tmp_path / "cache")}
    result = run_cli("ablate", str(RECIPES / "ablation_smoke.toml"), "--on", "ray", "--out", str(out),
                     "--progress", "plain", env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "14 cells, 14 to run on Ray (1 node" in result.stderr
    assert outcomes(out) == outcomes(local) and {s for s, _, _ in outcomes(out).values()} == {"done"}
    for cell in state_of(out)["cells"]:
        assert dev_records(out / cell["dir"]) == dev_records(local / cell["dir"]), cell["dir"]
        assert cell["node"]  # where it ran
    summaries = [json.loads((out / c["dir"] / "summary.json").read_text()) for c in state_of(out)["cells"]]
    sources = [s["teacher"]["source"] for s in summaries if "teacher" in s]  # the finetune cells have none
    tuned = [s for s in sources if not s.startswith("cache ")]
    assert len(tuned) == 1, sources  # one fine-tune; every other cell loaded it from the cache
    assert (out / "report.md").is_file() and (out / "results.csv").is_file()


def test_a_killed_worker_is_retried_and_its_cell_resumes(long_grid, tmp_path, tmp_path_factory):
    grid, local = long_grid
    one_cell = tmp_path / "grid.toml"
    one_cell.write_text(LONG_GRID.split("[variants.one-to-one]")[0])
    out = tmp_path / "ray"
    process = start("ablate", str(one_cell), "--on", "ray", "--out", str(out), "--progress", "plain",
                    env=cli_env(tmp_path_factory))
    try:
        assert wait_for(lambda: checkpointed_mid_cell(out), process), process.stderr.read()
        # Ray names the worker process after the task it runs.
        killed = subprocess.run(["pkill", "-KILL", "-f", "ray::kdframe-cell mrpc/emd/seed1"])
        assert killed.returncode == 0
        stderr = process.communicate(timeout=300)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr
    cell = state_of(out)["cells"][0]
    assert cell["status"] == "done" and cell["resumed"]  # the retry continued from the checkpoint
    assert dev_records(out / cell["dir"]) == dev_records(local / cell["dir"])


def test_a_grid_moves_between_executors_through_kills_and_sigterm(long_grid, tmp_path, tmp_path_factory):
    """Started locally and killed; resumed on Ray, whose driver is killed; resumed on Ray and
    stopped by Ctrl-C, then by SIGTERM; finished locally: every cell as in one uninterrupted local run. Each
    interruption lands once some unfinished cell has written a checkpoint in that phase."""
    grid, local = long_grid
    out = tmp_path / "out"
    env = cli_env(tmp_path_factory)
    variants = ("emd", "one-to-one")

    def interrupt(*executor, signum, group=True, sigint_ignored=False):
        process = start("ablate", str(grid), "--out", str(out), *executor, "--progress", "plain", env=env,
                        *(["--resume"] if (out / "ablation.json").exists() else []), sigint_ignored=sigint_ignored)
        before = {v: checkpoint_time(out, v) for v in variants}  # checkpoints of earlier phases do not count
        try:
            mid_cell = lambda: any(checkpointed_mid_cell(out, v, before[v]) for v in variants)  # noqa: E731
            assert wait_for(mid_cell, process), process.stderr.read()
            # To the whole group (the driver and the local Ray cluster it started), or the driver alone.
            (os.killpg if group else os.kill)(process.pid, signum)
            return process.returncode if signum == signal.SIGKILL else process.wait(timeout=120), process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            # Ray's workers have process groups of their own: a killed local cluster's workers stop
            # their cells when they find their raylet gone, a moment later. The next phase starts
            # after that, as a user's retry would.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and subprocess.run(["pgrep", "-f", "ray::kdframe-cell"]).returncode == 0:
                time.sleep(0.1)

    interrupt(signum=signal.SIGKILL)
    interrupt("--on", "ray", signum=signal.SIGKILL)
    assert "running" in {c["status"] for c in state_of(out)["cells"]}  # as the killed driver left it
    # Ctrl-C to the group of a driver started with SIGINT ignored (a background job; Python then
    # raises no KeyboardInterrupt), and SIGTERM to the driver alone, as a scheduler stops a job.
    for signum, group, code_wanted in ((signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)):
        code, process = interrupt("--on", "ray", signum=signum, group=group, sigint_ignored=True)
        stderr = process.stderr.read()
        assert code == code_wanted, stderr
        assert "--resume --on ray" in stderr and "interrupted (checkpointed)" in stderr
    result = run_cli("ablate", str(grid), "--out", str(out), "--resume", "--progress", "plain", env=env)
    assert result.returncode == 0, result.stderr
    assert outcomes(out) == outcomes(local)
    for cell in state_of(out)["cells"]:
        assert dev_records(out / cell["dir"]) == dev_records(local / cell["dir"]), cell["dir"]


def test_the_storage_probe_names_what_a_node_cannot_share(tmp_path):
    from kdframe.ablate_ray import PROBE, probe_storage

    shared, elsewhere = tmp_path / "shared", tmp_path / "local-disk"
    shared.mkdir()
    elsewhere.mkdir()
    (shared / f"{PROBE}t0k3n").write_text("t0k3n")
    assert probe_storage([str(shared)], "t0k3n") is None
    assert list(shared.iterdir()) == [shared / f"{PROBE}t0k3n"]  # its own test file is gone
    assert "does not see the driver's" in probe_storage([str(shared), str(elsewhere)], "t0k3n")
    if os.geteuid() != 0:  # root writes anywhere
        shared.chmod(0o555)
        try:
            assert probe_storage([str(shared)], "t0k3n").startswith(f"cannot write {shared}")
        finally:
            shared.chmod(0o755)


def test_bad_ray_invocations_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    grid, out = RECIPES / "ablation_smoke.toml", tmp_path / "out"
    assert main(["ablate", str(grid), "--out", str(out), "--on", "ray", "--jobs", "2"]) == 2
    assert "--jobs is for --on local" in capsys.readouterr().err
    assert main(["ablate", str(grid), "--out", str(out), "--ray-address", "10.0.0.1:6379"]) == 2
    assert "--ray-address needs --on ray" in capsys.readouterr().err
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert main(["ablate", str(grid), "--out", str(out), "--on", "ray", "--ray-address", f"127.0.0.1:{port}"]) == 2
    assert f"cannot connect to the Ray cluster at 127.0.0.1:{port}: Connection refused" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["ablate", str(grid), "--out", str(out), "--on", "ray"]) == 2
    assert "pip install 'kdframe[ray]'" in capsys.readouterr().err
    assert not out.exists()


def test_grid_resources_are_checked_and_merged(tmp_path, capsys):
    from kdframe.grid import load_grid

    path = tmp_path / "grid.toml"
    path.write_text(f'base = "{RECIPES / "smoke" / "emd.toml"}"\n[axes]\ntasks = ["mrpc"]\nseeds = [1]\n'
                    '[resources]\ncpus = 2\nmemory_gb = 4\n[variants.a]\n[variants.b]\nresources = { gpus = 1, cpus = 0.5 }\n')
    grid = load_grid(path)
    a, b = (grid.resources_of({"variant": v}) for v in ("a", "b"))
    assert (a.cpus, a.gpus, a.memory_gb, a.max_retries) == (2, 0, 4, 3)
    assert (b.cpus, b.gpus, b.memory_gb, b.max_retries) == (0.5, 1, 4, 3)
    path.write_text(path.read_text().replace("cpus = 2", "cpus = 0"))
    assert main(["ablate", str(path)]) == 2
    assert "resources.cpus: must be > 0, got 0" in capsys.readouterr().err
    path.write_text(path.read_text().replace("cpus = 0", "retries = 1"))
    assert main(["ablate", str(path)]) == 2
    assert "unknown key 'retries'; allowed: cpus, gpus, memory_gb, max_retries" in capsys.readouterr().err


def test_cells_no_cluster_can_hold_are_refused(tmp_path):
    from types import SimpleNamespace

    from kdframe.ablate_ray import check_fit
    from kdframe.errors import KdframeError
    from kdframe.grid import grid_cells, load_grid

    path = tmp_path / "grid.toml"
    path.write_text(f'base = "{RECIPES / "smoke" / "emd.toml"}"\n[axes]\ntasks = ["mrpc"]\nseeds = [1]\n'
                    '[variants.a]\n[variants.b]\nresources = { gpus = 1 }\n')
    grid = load_grid(path)
    cells = grid_cells(grid, tmp_path)
    check_fit(SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0, "GPU": 1.0}), grid, cells)
    with pytest.raises(KdframeError, match="cells ask for 1 CPUs and 1 GPUs, but the Ray cluster has 2 CPUs and 0 GPUs"):
        check_fit(SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0}), grid, cells)
