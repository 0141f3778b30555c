"""``kdframe ablate GRID --on ray``: the grid's cells as Ray tasks on a cluster (docs/ablation.md).

The driver (this process) keeps the ablation's order and state exactly as the local executor does
(``Ablation._drain``: one cell per uncached teacher first, its other cells once it is cached, the
state file written by the driver alone); only where a cell runs changes. Each cell is one Ray task
asking for its grid's ``[resources]``; a task whose worker process or node dies is run again by
Ray (``max_retries``), and ``run_cell`` then resumes the cell from its last checkpoint. So every
node must see ``--out`` and the cache (``KDFRAME_CACHE``) at the same paths: checked on every node
before any cell starts.
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from kdframe.cells import CellExecutor, run_cell, stop_when_orphaned
from kdframe.errors import KdframeError
from kdframe.grid import Cell, Grid

INSTALL = "pip install 'kdframe[ray]'"
PROBE = ".kdframe-storage-probe-"
GIB = 2**30
CONNECT_TIMEOUT_S = 10.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise KdframeError(f"--on ray needs Ray, which is not installed; install it with: {INSTALL}") from None
    return ray


def connect(address: str | None, cache: Path) -> Any:
    """Join the cluster at ``address`` (else ``RAY_ADDRESS``, else start one on this machine).

    The workers get the driver's ``KDFRAME_*`` settings, with ``KDFRAME_CACHE`` made absolute, so
    that every cell uses the cache the driver checked.
    """
    import logging

    ray = import_ray()
    env = {key: value for key, value in os.environ.items() if key.startswith("KDFRAME_")}
    env["KDFRAME_CACHE"] = str(cache)
    given = address or os.environ.get("RAY_ADDRESS")
    where = given or "a new local cluster"
    if given:
        _check_reachable(given)
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=True)
    except (Exception, SystemExit) as exc:  # whatever Ray raises (or exits with) for a cluster it cannot reach or start
        raise KdframeError(f"cannot connect to the Ray cluster at {where}: {type(exc).__name__}: "
                           f"{' '.join(str(exc).split())}") from None
    return ray


def _check_reachable(address: str) -> None:
    """One line in seconds for a ``HOST:PORT`` (or ``ray://HOST:PORT``) nobody answers at, where
    Ray would retry for minutes and then exit the process."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray resolves them
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise KdframeError(f"cannot connect to the Ray cluster at {address}: {exc.strerror or exc}; start it with"
                           " `ray start --head` on its head node, or leave out --ray-address and RAY_ADDRESS"
                           " to start one on this machine") from None


def probe_storage(dirs: list[str], token: str) -> str | None:
    """On a node: why it cannot share ``dirs`` with the driver (None when it can).

    The driver has written ``PROBE + token`` into each: a node that does not see it has another
    directory at that path (a local disk), which would split the grid's runs and teachers.
    """
    for directory in dirs:
        try:
            seen = (Path(directory) / f"{PROBE}{token}").read_text() == token
        except OSError:
            seen = False
        if not seen:
            return f"does not see the driver's {directory} (not on storage shared with the driver)"
        try:
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            return f"cannot write {directory}: {exc.strerror or exc}"
    return None


def check_storage(ray: Any, dirs: list[Path]) -> None:
    """Run ``probe_storage`` once on every live node; one line naming each node that fails."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    markers = [directory / f"{PROBE}{token}" for directory in dirs]
    try:
        for marker in markers:
            marker.write_text(token)
        probe = ray.remote(probe_storage)
        nodes = [node for node in ray.nodes() if node["Alive"]]
        answers = ray.get([probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote([str(d) for d in dirs], token) for node in nodes])
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
    problems = [f"node {node['NodeManagerAddress']} {answer}" for node, answer in zip(nodes, answers) if answer]
    if problems:
        raise KdframeError("; ".join(problems) + "; put --out and KDFRAME_CACHE on storage every node mounts at the"
                           " same path (docs/ablation.md, 'Running a grid on a cluster')")


def ray_cell(cell: Cell, root: str, plugins: list[str], threads: int) -> dict[str, Any]:
    """A cell on a Ray worker: ``run_cell`` with the cell's threads, quiet, stopped with a
    checkpoint if its node's raylet dies, and where it ran."""
    import torch

    torch.set_num_threads(threads)
    stop_when_orphaned()  # a worker's parent is its node's raylet
    return {**run_cell(cell, root, "off", plugins), "node": socket.gethostname()}


def check_fit(ray: Any, grid: Grid, cells: list[Cell]) -> None:
    """Every cell's request fits the cluster, else Ray would queue it forever."""
    total = ray.cluster_resources()
    too_big = sorted({f"{want.cpus:g} CPUs and {want.gpus:g} GPUs" for want in map(grid.resources_of, cells)
                      if want.cpus > total.get("CPU", 0) or want.gpus > total.get("GPU", 0)})
    if too_big:
        raise KdframeError(f"cells ask for {' / '.join(too_big)}, but the Ray cluster has {total.get('CPU', 0):g}"
                           f" CPUs and {total.get('GPU', 0):g} GPUs in all; lower [resources] in the grid file")


class RayCells(CellExecutor):
    """Cells as Ray tasks, as many at once as the cluster's CPUs and GPUs hold."""

    def __init__(self, ray: Any, grid: Grid, root: str, plugins: list[str], cells: list[Cell]):
        self.ray, self.grid, self.root, self.plugins = ray, grid, root, plugins
        self.task = ray.remote(ray_cell)
        self.refs: dict[Future, Any] = {}
        total = ray.cluster_resources()
        asked = [grid.resources_of(cell) for cell in cells]
        # As many at once as the smallest cells fit, so that cells marked running are running.
        fits = [total.get("CPU", 0) // min((r.cpus for r in asked), default=1)]
        fits += [total.get("GPU", 0) // r.gpus for r in asked if r.gpus]
        self.capacity = max(1, int(min(fits)))

    def submit(self, cell: Cell) -> Future:
        want = self.grid.resources_of(cell)
        ref = self.task.options(name=f"kdframe-cell {cell['task']}/{cell['variant']}/seed{cell['seed']}",
                                num_cpus=want.cpus, num_gpus=want.gpus, memory=int(want.memory_gb * GIB) or None,
                                max_retries=want.max_retries, retry_exceptions=False,
                                ).remote(cell, self.root, self.plugins, max(1, int(want.cpus)))
        future = ref.future()
        self.refs[future] = ref
        return future

    def interrupt(self, running: list[Future]) -> None:
        # Ray delivers a cancel to a running task as SIGINT: the cell's trainer checkpoints and stops.
        for future in running:
            self.ray.cancel(self.refs[future], force=False)

    def outcome(self, future: Future) -> dict[str, Any]:
        from ray.exceptions import TaskCancelledError

        self.refs.pop(future, None)
        try:
            return future.result()
        except TaskCancelledError:  # interrupted: its checkpoint, if any, is resumed by --resume
            return {"status": "pending", "error": None, "wall_time_s": None}
        except Exception as exc:  # its retries spent on dead workers or nodes
            return {"status": "failed", "error": f"Ray task failed: {type(exc).__name__}: {' '.join(str(exc).split())}",
                    "wall_time_s": None}
