"""One ablation cell, wherever it runs: ``run_cell`` (run, resume or restart it, never raising),
the interface of the executors that run cells (``CellExecutor``), and the watch that stops a
worker whose driver is gone. kdframe.ablate runs cells in this machine's processes,
kdframe.ablate_ray on a Ray cluster; both import this module, never each other's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from kdframe.checkpoint import has_checkpoint
from kdframe.errors import Interrupted, KdframeError, RunFailed
from kdframe.grid import Cell
from kdframe.rundir import CHECKPOINT, SUMMARY

ORPHAN_POLL_S = 1.0  # how often a worker checks that the process that started it is alive
ORPHAN_WATCH = "kdframe-orphan-watch"
_in_cell = threading.Event()  # set while run_cell runs in this process


def stop_cell_on_signal(signum: int, frame: Any) -> None:
    """A worker's SIGINT / SIGTERM handler. While a cell trains, its trainer's own handlers take
    over (finish the step, checkpoint, stop). Before that (models and data loading) the cell stops
    at once, with nothing to checkpoint yet: a signal ignored there let the cell train to the end
    after Ctrl-C. An idle worker ignores it (a KeyboardInterrupt would break the pool)."""
    if _in_cell.is_set():
        raise KeyboardInterrupt


def run_cell(cell: Cell, root: str, progress: str, plugins: list[str]) -> dict[str, Any]:
    """Run, resume or restart one cell; never raises: returns the fields to store for it.

    Module level so that worker processes can run it; ``status`` comes back "pending" when the
    cell was interrupted (it has a checkpoint, and --resume continues it).
    """
    from kdframe.library import run

    run_dir = Path(root) / cell["dir"]
    started = time.monotonic()
    resume = None
    _in_cell.set()
    try:
        if (run_dir / SUMMARY).is_file():  # finished, but killed before the state file said so
            summary = json.loads((run_dir / SUMMARY).read_text())
        else:
            resume = run_dir if has_checkpoint(run_dir / CHECKPOINT) else None
            if resume is None and run_dir.exists():
                shutil.rmtree(run_dir)  # died before its first checkpoint: nothing worth keeping
            summary = run(cell["recipe"], overrides=cell["overrides"], plugins=plugins, out=None if resume else run_dir,
                          resume=resume, progress=progress).summary
    except Interrupted as exc:
        return {"status": "pending", "error": None, "wall_time_s": None, "interrupted_by": exc.exit_code}
    except KeyboardInterrupt:
        return {"status": "pending", "error": None, "wall_time_s": None, "interrupted_by": 130}
    except (KdframeError, RunFailed) as exc:
        return {"status": "failed", "error": str(exc), "wall_time_s": round(time.monotonic() - started, 2)}
    except Exception as exc:  # a crash in one cell must not stop the others
        traceback.print_exc()
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "wall_time_s": round(time.monotonic() - started, 2)}
    finally:
        _in_cell.clear()
    metric = summary["main_metric"]
    student = summary["student"]
    # The run's own clock: a resumed cell's time includes its sessions before the interruption.
    return {"status": "done", "error": None, "wall_time_s": summary["wall_time_s"],
            "main_metric": metric, "best": (student["best"] or {}).get(metric),
            "final": (student["final"] or {}).get(metric), "resumed": resume is not None}


class CellExecutor:
    """Where ``Ablation._drain`` runs cells: ``capacity`` at once, each submitted as a future."""

    capacity: int

    def submit(self, cell: Cell) -> Future:
        raise NotImplementedError

    def interrupt(self, running: list[Future]) -> None:
        """Ctrl-C or SIGTERM reached the ablation: make the running cells checkpoint and stop."""

    def outcome(self, future: Future) -> dict[str, Any]:
        """The fields to store for a finished cell (``run_cell``'s), also when its worker died."""
        try:
            return future.result()
        except Exception as exc:  # the worker process died (e.g. killed for memory)
            return {"status": "failed", "error": f"worker process failed: {type(exc).__name__}: {exc}",
                    "wall_time_s": None}


def stop_when_orphaned() -> None:
    """End this worker once the process that started it is gone, its cell (if any) stopped with a
    checkpoint first (SIGTERM to itself).

    A killed ablation (SIGKILL, a lost terminal) does not take its workers with it; they would go
    on training their cells and writing their directories beside the cells a ``--resume`` starts,
    or wait for work forever.
    """
    if any(thread.name == ORPHAN_WATCH for thread in threading.enumerate()):
        return  # a reused worker (Ray's) is watched already
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        if _in_cell.is_set():
            os.kill(os.getpid(), signal.SIGTERM)  # the cell's trainer checkpoints and stops
            while _in_cell.is_set():
                time.sleep(ORPHAN_POLL_S)
        os._exit(128 + signal.SIGTERM)  # nobody is left to hand a result to

    threading.Thread(target=watch, name=ORPHAN_WATCH, daemon=True).start()
