"""kdframe ablate on tiny models: the smoke grid, teacher reuse, kill and resume, failed cells, grid errors."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT, cli_env, run_cli
from kdframe.cli import main

RECIPES = ROOT / "recipes"


def write_grid(path, variants, seeds=(1, 2)):
    """A grid over recipes/smoke; ``variants`` maps a name to its TOML body lines."""
    lines = [f'base = "{RECIPES / "smoke" / "emd.toml"}"', 'name = "test"', "[axes]", 'tasks = ["mrpc"]',
             f"seeds = {list(seeds)}"]
    for name, body in variants.items():
        lines += [f"[variants.{name}]", *body]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_ablation(grid, out, tmp_path_factory, *args, **popen):
    """``kdframe ablate GRID --out OUT ARGS`` in a session of its own (killpg reaches its workers)."""
    env = dict(os.environ, PYTHONPATH=str(FIXTURES), **cli_env(tmp_path_factory))
    return subprocess.Popen([sys.executable, "-m", "kdframe.cli", "ablate", str(grid), "--out", str(out), *args],
                            cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, **popen)


def state_of(out):
    return json.loads((out / "ablation.json").read_text())


def test_smoke_grid_runs_every_cell_and_reports(smoke_ablation):
    result, out = smoke_ablation
    assert result.returncode == 0, result.stderr
    assert "cell 14/14 mrpc/finetune/seed2" in result.stderr
    assert "; 1/14 cells done" in result.stderr and "; 14/14 cells done" in result.stderr  # not wrapped
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 14 and {r["status"] for r in rows} == {"done"}
    assert {(r["variant"], r["seed"]) for r in rows} == {
        (v, s) for v in ("emd", "emd-no-ca", "one-to-one", "uniform", "pkd", "kd", "finetune") for s in ("1", "2")}
    assert {"best_f1", "final_accuracy", "teacher_f1", "student_params", "wall_time_s"} <= set(rows[0])
    report = (out / "report.md").read_text()
    assert "| emd | **" in report and "*teacher*" in report and "inflates" in report
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"mrpc_dev_curve.png", "mrpc_emd_flow_start.png", "mrpc_emd_flow_end.png",
            "mrpc_emd_layer_weights.png", "mrpc_pkd_flow_end.png"} <= plots
    assert not any(name.startswith(("mrpc_kd_", "mrpc_finetune_")) for name in plots)  # no flows logged


def test_cells_of_a_task_share_the_cached_teacher(smoke_ablation):
    _, out = smoke_ablation
    summary = json.loads((out / "cells" / "mrpc" / "emd" / "seed2" / "summary.json").read_text())
    assert summary["teacher"]["source"].startswith("cache ")
    assert summary["seed"] == 2


def test_report_on_a_single_run_dir(smoke_ablation):
    from kdframe.report import write_report

    _, out = smoke_ablation
    run = out / "cells" / "mrpc" / "emd" / "seed1"
    names = {p.name for p in write_report(run)}
    assert names == {"dev_curve.png", "flow_start.png", "flow_end.png", "layer_weights.png", "report.md"}
    assert all((run / "plots" / n).is_file() for n in names - {"report.md"})
    assert "| distil | 8 |" in (run / "report.md").read_text()
    # A run without layer weights, and one without a summary, still get what can be drawn.
    assert {p.name for p in write_report(out / "cells" / "mrpc" / "kd" / "seed1")} == {"dev_curve.png", "report.md"}
    partial = out / "cells" / "mrpc" / "uniform" / "seed1"
    (partial / "summary.json").unlink()
    assert "layer_weights.png" in {p.name for p in write_report(partial)}


def test_an_ablation_in_use_is_refused_and_freed_when_its_holder_dies(tmp_path, tmp_path_factory, monkeypatch,
                                                                       capsys):
    """Two `ablate --resume` on one directory would start the same cells twice and overwrite each
    other's state file: the second is refused (exit 2, naming the first's pid) and changes
    nothing; once the first is killed, the ablation resumes."""
    grid = write_grid(tmp_path / "grid.toml", {"emd": []}, seeds=(1,))
    out = tmp_path / "out"
    monkeypatch.setenv("KDFRAME_ROBUST_SLOW", "5")
    process = start_ablation(grid, out, tmp_path_factory, "--progress", "off", "-p", "kdframe_robust_slow",
                             stderr=subprocess.PIPE)
    cell = out / "cells" / "mrpc" / "emd" / "seed1"
    try:
        deadline = time.monotonic() + 120
        while not (cell / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.poll() is None, process.stderr.read()
        state = (out / "ablation.json").read_bytes()
        assert main(["ablate", str(grid), "--out", str(out), "--resume"]) == 2
        assert process.poll() is None  # it was still running while the second was refused
        assert (out / "ablation.json").read_bytes() == state
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert f"{out} is in use by another kdframe process (pid {process.pid} on " in capsys.readouterr().err
    monkeypatch.delenv("KDFRAME_ROBUST_SLOW")
    result = run_cli("ablate", str(grid), "--out", str(out), "--resume", "--progress", "plain",
                     env=cli_env(tmp_path_factory))
    assert result.returncode == 0, result.stderr
    assert "resuming from its checkpoint" in result.stderr and state_of(out)["cells"][0]["status"] == "done"


def test_killed_ablation_resumes_without_redoing_done_cells(tmp_path, tmp_path_factory, capsys):
    grid = write_grid(tmp_path / "grid.toml", {"emd": [], "kd": [f'recipe = "{RECIPES / "smoke" / "kd.toml"}"']})
    out = tmp_path / "out"
    process = start_ablation(grid, out, tmp_path_factory, "--progress", "off", stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        # Kill once a cell is done and the next one has checkpointed part of its training.
        while time.monotonic() < deadline and process.poll() is None:
            if (out / "ablation.json").exists():
                cells = state_of(out)["cells"]
                running = [c for c in cells if c["status"] == "running"]
                if any(c["status"] == "done" for c in cells) and running \
                        and (out / running[0]["dir"] / "checkpoint.pt").exists():
                    break
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    cells = state_of(out)["cells"]
    done = [c for c in cells if c["status"] == "done"]
    assert done and any(c["status"] == "running" for c in cells), process.stderr.read()
    stamps = {c["dir"]: (out / c["dir"] / "summary.json").stat().st_mtime_ns for c in done}
    # A pending cell's half-written directory (no checkpoint) is cleared, not an error.
    junk = out / cells[-1]["dir"] / "junk.txt"
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_text("left by a killed run")

    assert main(["ablate", str(grid), "--out", str(out)]) == 2
    assert "add --resume" in capsys.readouterr().err
    result = run_cli("ablate", str(grid), "--out", str(out), "--resume", "--progress", "plain",
                     env=cli_env(tmp_path_factory))
    assert result.returncode == 0, result.stderr
    assert "resuming from its checkpoint" in result.stderr
    assert {c["status"] for c in state_of(out)["cells"]} == {"done"}
    # A cell's time is its run's, across the kill: the resumed cell's counts its first session too.
    for cell in state_of(out)["cells"]:
        assert cell["wall_time_s"] == json.loads((out / cell["dir"] / "summary.json").read_text())["wall_time_s"]
    assert {d: (out / d / "summary.json").stat().st_mtime_ns for d in stamps} == stamps
    assert not junk.exists()
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 4


def test_failed_cell_is_recorded_and_the_rest_complete_in_parallel(tmp_path, tmp_path_factory):
    grid = write_grid(tmp_path / "grid.toml", {
        "kd": [f'recipe = "{RECIPES / "smoke" / "kd.toml"}"'],
        "bad": ['set = ["stages[0].lr=-1.0"]'],
    }, seeds=[1])
    out = tmp_path / "out"
    result = run_cli("ablate", str(grid), "--out", str(out), "--jobs", "2", "--progress", "plain",
                     env=cli_env(tmp_path_factory))
    assert result.returncode == 1, result.stderr
    assert "1 of 2 cells failed: mrpc/bad/seed1" in " ".join(result.stderr.split())
    status = {c["variant"]: c for c in state_of(out)["cells"]}
    assert status["kd"]["status"] == "done"
    assert status["bad"]["status"] == "failed" and "stages[0].lr: must be > 0" in status["bad"]["error"]
    rows = {r["variant"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["bad"]["status"] == "failed" and "stages[0].lr" in rows["bad"]["error"] and rows["bad"]["best"] == ""
    assert "## Failed cells" in (out / "report.md").read_text()


def test_bad_input_fails_its_cell_at_once_and_a_fixed_grid_reruns_it(tmp_path, tmp_path_factory):
    """A cell whose data is missing fails before any cell starts, not when its turn comes; the rest
    runs. Fixing that cell in the grid and resuming runs it with its new overrides; a done cell's
    overrides cannot change under it."""
    kd = f'recipe = "{RECIPES / "smoke" / "kd.toml"}"'
    grid = write_grid(tmp_path / "grid.toml", {"kd": [kd], "typo": ["set = ['data.glue_dir=\"/nonexistent/glue\"']"]},
                      seeds=[1])
    out = tmp_path / "out"
    env = cli_env(tmp_path_factory)
    first = run_cli("ablate", str(grid), "--out", str(out), "--progress", "plain", env=env)
    assert first.returncode == 1, first.stderr
    lines = " ".join(first.stderr.split())
    assert lines.index("mrpc/typo/seed1 failed: ") < lines.index("mrpc/kd/seed1 starting")
    cells = {c["variant"]: c for c in state_of(out)["cells"]}
    assert cells["kd"]["status"] == "done" and cells["typo"]["status"] == "failed"
    assert "/nonexistent/glue/MRPC/train.tsv: file not found" in cells["typo"]["error"]

    write_grid(grid, {"kd": [kd], "typo": []}, seeds=[1])
    fixed = run_cli("ablate", str(grid), "--out", str(out), "--resume", "--progress", "plain", env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert "mrpc/typo/seed1 starting" in fixed.stderr and "mrpc/kd/seed1" not in fixed.stderr
    assert {c["variant"]: c["status"] for c in state_of(out)["cells"]} == {"kd": "done", "typo": "done"}
    assert json.loads((out / "cells/mrpc/typo/seed1/summary.json").read_text())["student"]["final"]

    write_grid(grid, {"kd": [kd, "set = ['stages[0].lr=1e-4']"], "typo": []}, seeds=[1])
    refused = run_cli("ablate", str(grid), "--out", str(out), "--resume", env=env)
    assert refused.returncode == 2 and "changed the recipe or overrides of mrpc/kd/seed1, which are done" in \
        " ".join(refused.stderr.split())


def test_a_cell_asking_for_a_gpu_fails_at_once_here_but_not_for_a_cluster(tmp_path):
    """Without CUDA on this machine a cell asking for fp16 is bad input for the local executor;
    on Ray the driver has no say: a worker with a GPU may run it."""
    from kdframe.ablate import Ablation, State
    from kdframe.grid import grid_cells, load_grid

    grid = write_grid(tmp_path / "grid.toml", {"fp16": ["set = ['precision=\"fp16\"']"]}, seeds=[1])
    for here, runnable in ((True, 0), (False, 1)):
        cells = grid_cells(load_grid(grid), tmp_path)
        ablation = Ablation(State(tmp_path, "ablation.json", {"cells": cells}), "off", [], lambda text: None)
        todo, _ = ablation.plan(cells, here=here)
        assert len(todo) == runnable
        assert cells[0]["status"] == ("failed" if not runnable else "pending")
    assert "precision: 'fp16' needs a CUDA device" in json.loads((tmp_path / "ablation.json").read_text())["cells"][0]["error"]


def test_planning_digests_each_data_set_once(tmp_path, monkeypatch):
    """The plan reads a grid's data once per data set, not once per cell (a digest reads every
    byte), and every cell of it gets the same cached-teacher file."""
    from kdframe.ablate import Ablation, State
    from kdframe.grid import grid_cells, load_grid
    from kdframe.plugins import PluginHost

    digests = []
    digest = PluginHost.data_fingerprint
    monkeypatch.setattr(PluginHost, "data_fingerprint", lambda host, data: digests.append(data) or digest(host, data))
    grid = write_grid(tmp_path / "grid.toml", {"a": [], "b": ["set = ['stages[0].lr=1e-4']"]}, seeds=[1, 2])
    cells = grid_cells(load_grid(grid), tmp_path)
    todo, teachers = Ablation(State(tmp_path, "ablation.json", {"cells": cells}), "off", [], lambda text: None).plan(cells)
    assert len(todo) == 4 and len(digests) == 1
    assert len(set(teachers.values())) == 1 and None not in teachers.values()


def test_grid_schema_errors_name_their_paths(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('nam = "x"\n[axes]\ntasks = ["mrpc"]\nseeds = [1]\n[variants.emd]\nsett = ["a=1"]\n')
    assert main(["ablate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "(top level): unknown key 'nam'" in err and "unknown key 'sett'; allowed: recipe, set" in err

    bad.write_text('base = "missing.toml"\n[axes]\ntasks = ["mrpc", "mrpc"]\nseeds = []\n'
                   '[tasks_set]\nrte = ["data.glue_dir=x"]\n[variants.emd]\n')
    assert main(["ablate", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    for problem in ("axes.tasks: 'mrpc' is listed twice", "axes.seeds: give at least one",
                    "tasks_set.rte: 'rte' is not in axes.tasks", "base: recipe file not found"):
        assert problem in err
    assert not (tmp_path / "out").exists()
    assert main(["ablate", str(RECIPES / "ablation_smoke.toml"), "--shard", "2/2"]) == 2


def test_parallel_cells_wait_only_for_their_own_teacher(tmp_path, monkeypatch):
    """Two processes, teacher T uncached: its first cell fine-tunes it, a cell with a cached teacher
    runs beside the fine-tuning instead of leaving a process idle, and the other T cell starts once
    T is cached, while the first T cell is still distilling, not before."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kdframe import ablate

    monkeypatch.setattr(ablate, "PROGRESS_EVERY_S", 0.02)  # how often a waiting cell is re-checked
    uncached, cached = tmp_path / "t.pt", tmp_path / "cached.pt"
    cached.write_text("")
    cells = [{"task": t, "variant": "v", "seed": 1, "dir": f"cells/{t}", "recipe": "", "overrides": [],
              "status": "pending"} for t in ("a1", "a2", "b1")]
    teachers = {id(cells[0]): uncached, id(cells[1]): uncached, id(cells[2]): cached}
    events, lock = [], threading.Lock()
    b1_ended, a2_started = threading.Event(), threading.Event()

    def record(*event):
        with lock:
            events.append(event)

    def fake_run_cell(cell, root, progress, plugins):
        task = cell["task"]
        record("start", task, uncached.exists())
        if task == "a1":
            assert b1_ended.wait(5)  # fine-tuning outlasts the cached-teacher cell
            record("teacher cached")
            uncached.write_text("")
            assert a2_started.wait(5)  # distilling: the waiting cell must not wait for this
        elif task == "a2":
            a2_started.set()
        record("end", task)
        if task == "b1":
            b1_ended.set()
        return {"status": "done", "wall_time_s": 0.0, "main_metric": "m", "best": 1.0, "final": 1.0}

    monkeypatch.setattr(ablate, "run_cell", fake_run_cell)
    state = ablate.State(tmp_path, "ablation.json", {"cells": cells})
    runner = ablate.Ablation(state, "off", [], lambda text: None)
    with ThreadPoolExecutor(2) as pool:
        assert runner._drain(ablate.ProcessCells(pool, 2, str(tmp_path), [], runner.terminated), cells, teachers)
    assert {c["status"] for c in cells} == {"done"}
    starts = {e[1]: (i, e[2]) for i, e in enumerate(events) if e[0] == "start"}
    assert starts["b1"][0] < events.index(("end", "a1"))  # no idle process during the fine-tune
    assert starts["a2"][1] and starts["a2"][0] > events.index(("teacher cached",))  # found T cached
    assert starts["a2"][0] < events.index(("end", "a1"))  # did not wait for a1's distillation


def test_parallel_ablation_prints_the_running_cells_progress(tmp_path, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kdframe import ablate
    from kdframe.progress import Progress

    monkeypatch.setattr(ablate, "PROGRESS_EVERY_S", 0.02)
    cell = {"task": "mrpc", "variant": "kd", "seed": 1, "dir": "cells/x", "recipe": "", "overrides": [],
            "status": "pending"}
    lines, seen = [], threading.Event()

    def fake_run_cell(cell, root, progress_mode, plugins):
        progress = Progress("off")
        progress.status_file = tmp_path / cell["dir"] / "progress.json"
        progress.status_file.parent.mkdir(parents=True)
        progress.start("distil", 10, 0)
        progress.update(3, "loss 0.5000", 1)  # throttled: the file still says step 0
        progress.update(10, "loss 0.2500", 1)  # the last step is always written
        assert seen.wait(5)
        return {"status": "done", "wall_time_s": 0.0, "main_metric": "f1", "best": 0.5, "final": 0.5}

    def say(text):
        lines.append(text)
        if "step 10/10" in text:
            seen.set()

    monkeypatch.setattr(ablate, "run_cell", fake_run_cell)
    runner = ablate.Ablation(ablate.State(tmp_path, "ablation.json", {"cells": [cell]}), "plain", [], say)
    with ThreadPoolExecutor(1) as pool:
        assert runner._drain(ablate.ProcessCells(pool, 1, str(tmp_path), [], runner.terminated), [cell],
                             {id(cell): None})
    assert "0/1 cells done, 1 running, 0 waiting, 0 failed" in lines  # the tally before each cell's line
    progress_lines = [line for line in lines if "step " in line]
    assert progress_lines and "\\[distil] step 10/10 loss 0.2500" in progress_lines[-1]
    assert not any("step 3/10" in line for line in lines)


def test_the_tally_counts_cells_and_projects_the_time_left(tmp_path):
    from kdframe import ablate

    cells = [{"task": "t", "variant": v, "seed": 1, "status": status, "wall_time_s": wall}
             for v, status, wall in (("a", "done", 60.0), ("b", "done", 180.0), ("c", "failed", 5.0),
                                     ("d", "running", None), ("e", "running", None), ("f", "pending", None))]
    runner = ablate.Ablation(ablate.State(tmp_path, "ablation.json", {"cells": cells}), "plain", [], print)
    # 3 cells left at 2 min each (the done cells' mean), 2 at a time: 3 min
    assert runner.tally(2, 1) == "2/6 cells done, 2 running, 1 waiting, 1 failed; ~3 min left at 2.0 min per cell"
    for cell in cells[:2]:
        cell["status"] = "pending"
    assert runner.tally(2, 1) == "0/6 cells done, 2 running, 1 waiting, 1 failed"  # no pace yet


def test_workers_of_a_killed_ablation_checkpoint_and_stop(tmp_path, tmp_path_factory):
    """SIGKILL to the ablation alone (not its group): its --jobs workers notice, checkpoint their
    cells and exit, instead of training on beside a --resume."""
    grid = write_grid(tmp_path / "grid.toml", {"emd": ['set = ["stages[0].epochs=30"]']}, seeds=[1])
    out = tmp_path / "out"
    process = start_ablation(grid, out, tmp_path_factory, "--jobs", "2", "--progress", "off",
                             stderr=subprocess.DEVNULL)
    checkpoint = out / "cells" / "mrpc" / "emd" / "seed1" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not checkpoint.exists():
            time.sleep(0.05)
        workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == process.pid]
        assert workers and checkpoint.exists()
        process.kill()
        process.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left of it: the expected case
            os.killpg(process.pid, signal.SIGKILL)
    run = checkpoint.parent
    assert not (run / "summary.json").exists()  # stopped, not trained to the end
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("stage") == "distil"]
    assert steps and max(steps) < 30 * 4  # 64 examples / 16 per batch = 4 steps per epoch


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_stops_a_parallel_ablation_with_its_cells_checkpointed(tmp_path, tmp_path_factory, inherited):
    """Ctrl-C (SIGINT to the process group) stops a --jobs ablation: the running cells checkpoint and
    it exits 130 with the resume command. Also when it was started with SIGINT ignored, as a
    shell's background job is: Python then installs no KeyboardInterrupt, so the driver must."""
    grid = write_grid(tmp_path / "grid.toml", {"emd": ['set = ["stages[0].epochs=30"]']}, seeds=[1, 2])
    out = tmp_path / "out"
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if inherited == "ignored" else None
    process = start_ablation(grid, out, tmp_path_factory, "--jobs", "2", "--progress", "plain",
                             preexec_fn=ignore, stderr=subprocess.PIPE, text=True)
    checkpoints = [out / "cells" / "mrpc" / "emd" / f"seed{seed}" / "checkpoint.pt" for seed in (1, 2)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(c.exists() for c in checkpoints):
            time.sleep(0.05)
        assert any(c.exists() for c in checkpoints)
        os.killpg(process.pid, signal.SIGINT)
        stderr = process.communicate(timeout=120)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "interrupted (checkpointed)" in stderr and "--resume" in stderr
    assert {c["status"] for c in state_of(out)["cells"]} == {"pending"}  # both run again on --resume
    assert not any((c.parent / "summary.json").exists() for c in checkpoints)  # stopped, not trained to the end


def _parent(proc):
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
