"""``kdframe ablate``: a grid of recipe variants x tasks x seeds, each cell a normal run.

A grid file (paths relative to it)::

    base = "emd_glue.toml"                 # the recipe every variant starts from
    name = "emd-ablation"                  # default --out: runs/ablation-<name>
    set = ["stages[0].epochs=1"]           # overrides for every cell (e.g. to shorten runs)

    [axes]
    tasks = ["mrpc", "rte"]                # sets data.task
    seeds = [1, 2, 3]                      # sets seed (the teacher keeps teacher.seed)

    [tasks_set]                            # overrides for one task's cells
    rte = ["data.glue_dir=../../shared/data/glue"]

    [variants.emd]                         # the base recipe as it is
    [variants.emd-no-ca]
    set = ["stages[0].weighting.strategy=uniform"]
    [variants.pkd]
    recipe = "pkd_glue.toml"               # another recipe instead of base

A cell's overrides apply in this order: the grid's ``set``, ``tasks_set[task]``, the variant's
``set``, then the task and the seed. They are ``--set`` overrides: a relative path in a value is
relative to the cell's recipe file, not to the grid.

The ablation directory::

    ablation.json                          grid, cells, and each cell's status (rewritten atomically)
    cells/<task>/<variant>/seed<seed>/     one run directory per cell
    results.csv, report.md, plots/         kdframe.report, written at the end

Cells of one task share one fine-tuned teacher through the engine's teacher cache (keyed by the
teacher spec, the data's content and teacher.seed, not the recipe seed): only the first such cell fine-tunes it.
With ``--jobs N`` the cells run in N spawned processes; one cell per uncached teacher runs first
and the other cells of that teacher wait until it is cached (that cell goes on distilling), so
that they load it instead of each fine-tuning it, while cells whose teacher is cached (or that need
none) use the free processes.

``--resume`` skips done cells, continues an unfinished cell from its checkpoint, and restarts a cell
that died before its first checkpoint (or failed before training) from scratch.

Several machines: ``--on ray`` runs the cells as tasks on a Ray cluster (kdframe.ablate_ray; the
same order, state file and resume). One process runs an ablation: it holds a lock on its state
file, and a second ``kdframe ablate`` on the same ``--out`` is refused (exit 2) while it runs (on a
shared filesystem without ``flock``, two machines would take the same pending cells and overwrite
each other's state file). Without a cluster, shard the grid: ``--shard I/N`` runs only the cells
with index % N == I and keeps its state in ``ablation.shard-I-of-N.json``. Shards write disjoint
cell directories, so they can share one directory on a shared filesystem, or run in separate ones
copied together afterwards; ``kdframe report DIR`` reads every state file it finds. Point
``KDFRAME_CACHE`` at a shared directory to fine-tune each teacher once, otherwise each machine
fine-tunes its tasks' teachers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import shutil
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

from kdframe.cells import CellExecutor, run_cell, stop_cell_on_signal, stop_when_orphaned
from kdframe.checkpoint import has_checkpoint
from kdframe.errors import Interrupted, KdframeError
from kdframe.fileio import exclusive_use
from kdframe.grid import STATE, Cell, Grid, cell_label, grid_cells, load_grid, parse_shard, state_file_name
from kdframe.invocation import kdframe_command
from kdframe.plugins import PluginHost
from kdframe.rundir import CHECKPOINT, PROGRESS, RunDir

PROGRESS_EVERY_S = 60.0  # with --jobs: how often the parent prints the running cells' progress


# -- the state file -----------------------------------------------------------------------------

class State:
    """The state file: rewritten atomically after every change, so a kill leaves a readable one."""

    def __init__(self, root: Path, name: str, data: dict[str, Any]):
        self.root = root
        self.name = name
        self.data = data

    @property
    def cells(self) -> list[Cell]:
        return self.data["cells"]

    def update(self, cell: Cell, **fields: Any) -> None:
        cell.update(fields)
        RunDir(self.root).write_json(self.name, self.data)

    @staticmethod
    def claim(root: Path, name: str, resume: bool) -> None:
        """Check that ``root`` can hold the ablation (``name`` its state file) and create it."""
        if root.exists() and not root.is_dir():
            raise KdframeError(f"--out {root} is a file; give a directory for the ablation")
        if resume:
            if not (root / name).is_file():
                raise KdframeError(f"--resume: {root} holds no {name}; start the ablation without --resume")
        elif (root / name).exists() or (name == STATE and root.exists() and any(root.iterdir())):
            # Shards may share a directory, so for them only their own state file counts.
            raise KdframeError(f"--out {root} is not empty; add --resume to continue the ablation there,"
                               " or choose another --out")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KdframeError(f"cannot create ablation directory {root}: {exc.strerror}") from None

    @classmethod
    def open(cls, root: Path, name: str, resume: bool, header: dict[str, Any], cells: list[Cell]) -> "State":
        """The claimed directory's state: the stored one merged into ``cells`` when resuming."""
        path = root / name
        if resume:
            try:
                stored = {cell_label(c): c for c in json.loads(path.read_text())["cells"]}
            except (ValueError, KeyError, TypeError) as exc:
                raise KdframeError(f"{path} cannot be read ({exc})") from None
            changed, redefined = [], []
            for cell in cells:
                old = stored.get(cell_label(cell))
                if old is None:
                    continue  # a cell added to the grid since: it starts as pending
                if (old["recipe"], old["overrides"]) == (cell["recipe"], cell["overrides"]):
                    cell.update(old)  # its status and outcome so far
                elif old["status"] == "done" or (old["status"] != "failed"
                                                  and has_checkpoint(root / old["dir"] / CHECKPOINT)):
                    changed.append(cell_label(cell))  # a result, or training to continue, of the old recipe
                else:
                    redefined.append(cell)  # failed, or stopped before its first checkpoint: it starts anew
            if changed:
                raise KdframeError(f"--resume {root}: the grid changed the recipe or overrides of {', '.join(changed)},"
                                   " which are done or have a checkpoint; restore the grid or use a new --out")
            for cell in redefined:
                shutil.rmtree(root / cell["dir"], ignore_errors=True)
        state = cls(root, name, {**header, "cells": cells})
        RunDir(root).write_json(name, state.data)
        return state


# -- cells' outcomes and workers ------------------------------------------------------------------

def _outcome_line(cell: Cell) -> str:
    from rich.markup import escape

    wall = f" in {cell['wall_time_s']:.0f}s" if cell["wall_time_s"] is not None else ""
    if cell["status"] == "done":
        best, final = (f"{v:.4f}" if v is not None else "-" for v in (cell["best"], cell["final"]))
        return f"[green]done[/green]{wall}: {cell['main_metric']} best {best}, final {final}"
    if cell["status"] == "failed":
        return f"[red]failed[/red]{wall}: " + escape(" ".join(cell["error"].split()))
    return "[yellow]interrupted[/yellow] (checkpointed)"


def _teacher_to_cache(cell: Cell, host: PluginHost, here: bool, fingerprints: dict[str, str | None]) -> Path | None:
    """The cached-teacher file this cell would fine-tune, if any. Raises KdframeError for the bad
    input its recipe shows before models load: what ``kdframe run`` checks first, and the data
    files where it fine-tunes a teacher (the cache key reads them); the device only ``here``, where
    the cells run on this machine. ``fingerprints`` keeps each data section's digest: a grid's many
    cells read a few data sets, and a digest reads every byte of them."""
    from kdframe.caches import teacher_path
    from kdframe.recipe import to_plain
    from kdframe.session import check_recipe

    loaded = check_recipe(cell["recipe"], cell["overrides"], host, here)
    recipe = loaded.recipe
    if recipe.teacher.train is None or not any(s.needs_teacher(host.registry) for s in loaded.stages):
        return None
    data = json.dumps(to_plain(recipe.data), sort_keys=True)
    if data not in fingerprints:
        fingerprints[data] = host.data_fingerprint(recipe.data)
    return teacher_path(recipe, fingerprints[data])


def _init_worker(threads: int) -> None:
    import torch

    # Ctrl-C reaches every process in the group, and the parent passes SIGTERM on.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_cell_on_signal)
    torch.set_num_threads(threads)
    stop_when_orphaned()


class Terminated:
    """SIGTERM to the ablation's own process stops it like Ctrl-C: the running cells checkpoint
    (their workers get the signal passed on), and the exit code says which signal it was."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.received:
            return
        self.received = True
        raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        return 128 + (signal.SIGTERM if self.received else signal.SIGINT)


# -- the ablation -------------------------------------------------------------------------------

class Ablation:
    """Runs the cells not done yet, serially in this process or in worker processes."""

    def __init__(self, state: State, progress: str, plugins: list[str], say: Callable[[str], None]):
        self.state = state
        self.progress = progress
        self.plugins = plugins
        self.say = say
        self.position = {id(c): k for k, c in enumerate(state.cells, 1)}
        self.terminated = Terminated()
        self.exit_code = 130  # of an interruption: 143 when it came as SIGTERM

    def tag(self, cell: Cell) -> str:
        return f"cell {self.position[id(cell)]}/{len(self.state.cells)} [bold]{cell_label(cell)}[/bold]"

    def start(self, cell: Cell) -> None:
        resumed = has_checkpoint(self.state.root / cell["dir"] / CHECKPOINT)
        self.say(f"{self.tag(cell)} {'resuming from its checkpoint' if resumed else 'starting'}")
        self.state.update(cell, status="running", error=None)

    def finish(self, cell: Cell, outcome: dict[str, Any]) -> bool:
        """Store a cell's outcome; False when it was interrupted."""
        self.exit_code = outcome.pop("interrupted_by", self.exit_code)
        self.state.update(cell, **outcome)
        done = sum(c["status"] == "done" for c in self.state.cells)
        self.say(f"{self.tag(cell)} {_outcome_line(cell)}; {done}/{len(self.state.cells)} cells done")
        return cell["status"] != "pending"

    def progress_of(self, cell: Cell) -> str:
        """A running cell's progress from its run directory's status file (workers show no bars)."""
        try:
            status = json.loads((self.state.root / cell["dir"] / PROGRESS).read_text())
            step, total, rate = status["step"], status["total"], float(status["steps_per_s"])
            line = f"[{status['label']}] step {step}/{total}"
        except (OSError, ValueError, KeyError, TypeError):
            return "preparing (no progress yet)"
        info = f" {status['info']}" if status.get("info") else ""
        eta = f", stage ends in ~{(total - step) / rate / 60:.0f} min" if rate else ""
        return f"{line}{info} ({rate:.2f} steps/s{eta})"

    def plan(self, todo: list[Cell], here: bool = True) -> tuple[list[Cell], dict[int, Path | None]]:
        """The cells that can run, and the cached-teacher file each would fine-tune. A cell whose
        recipe shows bad input is recorded as failed at once, so that a typo in one task's
        overrides shows in the first lines, not when that task's turn comes hours later; the rest
        of the grid runs, as it would have."""
        from kdframe.plugins import load_plugins

        host = load_plugins(self.plugins)
        teachers: dict[int, Path | None] = {}
        fingerprints: dict[str, str | None] = {}
        for cell in todo:
            try:
                teachers[id(cell)] = _teacher_to_cache(cell, host, here, fingerprints)
            except KdframeError as exc:
                self.finish(cell, {"status": "failed", "error": str(exc), "wall_time_s": None})
        return [c for c in todo if id(c) in teachers], teachers

    def run_serial(self, todo: list[Cell]) -> bool:
        todo, _ = self.plan(todo)
        for cell in todo:
            self.start(cell)
            if not self.finish(cell, run_cell(cell, str(self.state.root), self.progress, self.plugins)):
                return False
        return True

    def run_parallel(self, todo: list[Cell], jobs: int) -> bool:
        todo, teachers = self.plan(todo)
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            return self._drain(ProcessCells(pool, jobs, str(self.state.root), self.plugins, self.terminated),
                               teachers_first(todo, teachers), teachers)

    def run_ray(self, ray: Any, grid: Grid, todo: list[Cell]) -> bool:
        from kdframe.ablate_ray import RayCells

        todo, teachers = self.plan(todo, here=False)  # a worker has the devices, not the driver
        return self._drain(RayCells(ray, grid, str(self.state.root.resolve()), self.plugins, todo),
                           teachers_first(todo, teachers), teachers)

    def _drain(self, executor: "CellExecutor", cells: list[Cell], teachers: dict[int, Path | None]) -> bool:
        """Keep up to ``executor.capacity`` cells running; after Ctrl-C let the running ones
        checkpoint and stop."""
        from rich.markup import escape

        queue = list(cells)
        running: dict[Future, Cell] = {}
        fine_tuning: dict[int, Path] = {}  # running cell -> the teacher it is fine-tuning

        def ready(cell: Cell) -> bool:
            # The cache file is written atomically when the teacher stage ends, long before the
            # cell that fine-tunes it has distilled its student; polled every PROGRESS_EVERY_S.
            target = teachers[id(cell)]
            return target not in fine_tuning.values() or target.exists()

        complete = True
        while queue or running:
            # Ctrl-C may come at any point of an iteration; the cells then checkpoint and stop, and a
            # cell whose outcome was not stored yet stays "running" in the state file: --resume
            # continues it from its checkpoint.
            try:
                while complete and len(running) < executor.capacity and (cell := next(filter(ready, queue), None)):
                    queue.remove(cell)
                    target = teachers[id(cell)]
                    if target is not None and not target.exists():
                        fine_tuning[id(cell)] = target
                    self.start(cell)
                    running[executor.submit(cell)] = cell
                if not running:
                    break
                done, _ = wait(running, timeout=PROGRESS_EVERY_S, return_when=FIRST_COMPLETED)
                if not done:
                    self.say(self.tally(len(running), len(queue)))
                    for cell in running.values():
                        self.say(f"{self.tag(cell)} {escape(self.progress_of(cell))}")
                for future in done:
                    cell = running.pop(future)
                    fine_tuning.pop(id(cell), None)
                    complete = self.finish(cell, executor.outcome(future)) and complete
            except KeyboardInterrupt:
                if complete:
                    complete = False
                    executor.interrupt(list(running))
                    self.say("interrupt: waiting for the running cells to checkpoint and stop")
        return complete

    def tally(self, running: int, waiting: int) -> str:
        """Cells done, running, waiting and failed, and the time left at the finished cells' pace."""
        cells = self.state.cells
        done = [c for c in cells if c["status"] == "done" and c["wall_time_s"] is not None]
        failed = sum(c["status"] == "failed" for c in cells)
        left = sum(c["status"] not in ("done", "failed") for c in cells)
        line = (f"{sum(c['status'] == 'done' for c in cells)}/{len(cells)} cells done, {running} running,"
                f" {waiting} waiting, {failed} failed")
        if done and left:
            mean = sum(c["wall_time_s"] for c in done) / len(done)
            line += f"; ~{left * mean / max(1, running) / 60:.0f} min left at {mean / 60:.1f} min per cell"
        return line


def _join_ray(address: str | None, root: Path, grid: Grid, cells: list[Cell]) -> Any:
    """Connect to the cluster and check that it can run every cell and that every node shares
    ``root`` and the cache with this driver, before the ablation directory holds anything (a
    failed check removes what it made)."""
    from kdframe.ablate_ray import check_fit, check_storage, connect
    from kdframe.caches import cache_root
    from kdframe.recipe import DataSpec

    cache = cache_root(DataSpec()).resolve()
    ray = connect(address, cache)
    check_fit(ray, grid, cells)
    made = [d for d in (root, cache) if not d.exists()]
    try:
        for directory in (root, cache):
            directory.mkdir(parents=True, exist_ok=True)
        check_storage(ray, [root.resolve(), cache])
    except BaseException as exc:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(exc, OSError):
            raise KdframeError(f"cannot write {exc.filename}: {exc.strerror}") from None
        raise
    return ray


def _cluster_size(ray: Any) -> str:
    total = ray.cluster_resources()
    nodes = sum(node["Alive"] for node in ray.nodes())
    return f"{nodes} node{'s' * (nodes != 1)}, {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"


class ProcessCells(CellExecutor):
    """Cells in worker processes of this machine (``--jobs N``)."""

    def __init__(self, pool: Any, capacity: int, root: str, plugins: list[str], terminated: "Terminated"):
        self.pool, self.capacity, self.root, self.plugins, self.terminated = pool, capacity, root, plugins, terminated

    def submit(self, cell: Cell) -> Future:
        # Workers run quietly: several progress bars would interleave.
        return self.pool.submit(run_cell, cell, self.root, "off", self.plugins)

    def interrupt(self, running: list[Future]) -> None:
        if self.terminated.received:  # Ctrl-C reached the workers too; SIGTERM came to this process
            for worker in list(getattr(self.pool, "_processes", {}).values()):
                worker.terminate()  # SIGTERM: a training cell checkpoints and stops


def teachers_first(todo: list[Cell], teachers: dict[int, Path | None]) -> list[Cell]:
    """The cells in the order to start them: one cell per uncached teacher goes first and
    fine-tunes it; cells that need a teacher still being fine-tuned wait for it, and cells that do
    not fill the free processes meanwhile."""
    first: dict[Path, Cell] = {}
    for cell in todo:
        target = teachers[id(cell)]
        if target is not None and not target.exists():
            first.setdefault(target, cell)
    return list(first.values()) + [c for c in todo if all(c is not f for f in first.values())]


def run_ablation(grid_path: str, out: str | None, resume: bool, jobs: int, progress: str,
                 plugins: list[str], shard: str | None = None, on: str = "local",
                 ray_address: str | None = None) -> int:
    """Run every cell not done yet (in this machine's processes, or ``on="ray"`` as tasks of a Ray
    cluster), then write the report; exit code 1 if any cell failed."""
    from rich.console import Console

    from kdframe.report import write_report

    if jobs < 1:
        raise KdframeError(f"--jobs {jobs}: must be at least 1")
    if on == "ray" and jobs != 1:
        raise KdframeError("--jobs is for --on local; on Ray each cell asks for the grid's [resources] and runs"
                           " wherever the cluster has them")
    if on != "ray" and ray_address:
        raise KdframeError("--ray-address needs --on ray")
    index, count = parse_shard(shard)
    path = Path(grid_path)
    grid = load_grid(path)
    cells = [c for i, c in enumerate(grid_cells(grid, path.resolve().parent)) if i % count == index]
    root = Path(out) if out else Path("runs") / f"ablation-{grid.name}"
    cluster = _join_ray(ray_address, root, grid, cells) if on == "ray" else None
    header = {"grid": str(path.resolve()), "name": grid.name, "shard": shard}
    name = state_file_name(shard)
    State.claim(root, name, resume)
    # One process per state file: a second `ablate --resume` would start the same cells again.
    with exclusive_use(root / f".{name}.lock"):
        state = State.open(root, name, resume, header, cells)

        console = Console(stderr=True, highlight=False, soft_wrap=True)  # one line per event, also in log files
        ablation = Ablation(state, progress, plugins, console.print if progress != "off" else lambda text: None)
        todo = [c for c in state.cells if c["status"] != "done"]
        where = f" on Ray ({_cluster_size(cluster)})" if cluster else ""
        ablation.say(f"{path.name}: {len(state.cells)} cells, {len(todo)} to run{where}, in {root.resolve()}")
        # A process started as a shell's background job inherits SIGINT ignored, and Python then raises
        # no KeyboardInterrupt: on Ray, whose workers do not share the driver's process group, the grid
        # would go on. The driver asks for it, as `kdframe run`'s trainer installs its own handler.
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, ablation.terminated),
                    signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
        try:
            if cluster is not None:
                finished = ablation.run_ray(cluster, grid, todo)
            else:
                finished = ablation.run_parallel(todo, jobs) if jobs > 1 and todo else ablation.run_serial(todo)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if not finished:
            again = [*kdframe_command(), "ablate", grid_path, "--out", str(root), "--resume",
                     *(["--shard", shard] if shard else []), *(["--on", "ray"] if cluster else []),
                     *(["--ray-address", ray_address] if ray_address else [])]
            code = ablation.terminated.exit_code if ablation.terminated.received else ablation.exit_code
            raise Interrupted(f"ablation interrupted; continue with: {shlex.join(again)}", code)
        for written in write_report(root):
            ablation.say(f"wrote {written}")
        failed = [cell_label(c) for c in state.cells if c["status"] == "failed"]
        if failed:
            console.print(f"kdframe: {len(failed)} of {len(state.cells)} cells failed: {', '.join(failed)}"
                          f" (errors in {root / state.name})")
            return 1
        return 0
