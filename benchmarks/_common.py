"""Shared helpers for the benchmark scripts: timing, statistics, machine load, result files.

Every result row carries ``loadavg`` (``os.getloadavg()`` when it was taken): the numbers in
benchmarks/results were measured on a shared 2-core machine with other work running, so
absolute times are noisy; ratios measured in one process, interleaved, are what to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]  # the repository root
RESULTS = Path(__file__).resolve().parent / "results"


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "loadavg_at_start": loadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    import hashlib

    # which version of the code was measured (the step, the trainer and plugins change under the benchmarks);
    # kdframe/optim.py holds the step's optimizer, kdframe/flows.py the transport solvers' common part
    for rel in ("kdframe/step.py", "kdframe/trainer.py", "kdframe/optim.py", "kdframe/flows.py",
                "plugins/kdframe_costs/__init__.py", "plugins/kdframe_emd/__init__.py",
                "plugins/kdframe_cost_attention/__init__.py", "plugins/kdframe_hf/capture.py"):
        path = ROOT / rel
        if path.exists():
            info.setdefault("source_sha256", {})[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    for name in ("ot", "pyemd", "transformers"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    return info


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range of ``values`` (seconds or ratios)."""
    v = sorted(values)
    if not v:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"), "n": 0}
    if len(v) == 1:
        return {"median": v[0], "q1": v[0], "q3": v[0], "n": 1}
    q = statistics.quantiles(v, n=4, method="inclusive")
    return {"median": float(statistics.median(v)), "q1": float(q[0]), "q3": float(q[2]), "n": len(v)}


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1,
               budget_s: float | None = None) -> dict[str, list[float]]:
    """Wall and CPU times (seconds) of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones;
    stops early (keeping at least 3) once ``budget_s`` of wall time is spent."""
    for _ in range(warmup):
        fn()
    out: dict[str, list[float]] = {"wall": [], "cpu": []}
    started = time.perf_counter()
    for _ in range(repeats):
        clock = Clock()
        fn()
        wall, cpu = clock.lap()
        out["wall"].append(wall)
        out["cpu"].append(cpu)
        if budget_s is not None and len(out["wall"]) >= 3 and time.perf_counter() - started > budget_s:
            break
    return out


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                budget_s: float | None = None) -> dict[str, dict[str, list[float]]]:
    """Time every function once per round, in a rotating order (A B C, B C A, ...), so slow
    drifts of the machine's load hit every variant alike. Returns wall and CPU times per variant
    (index r of every list is round r, so per-round ratios pair neighbours in time)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    started = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            clock = Clock()
            fns[name]()
            wall, cpu = clock.lap()
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
        if budget_s is not None and r >= 2 and time.perf_counter() - started > budget_s:
            break
    return times


@contextlib.contextmanager
def attn_implementation(model: Any, name: str | None) -> Iterator[None]:
    """Run ``model``'s forwards inside under the attention implementation ``name`` (None: its own)."""
    if name is None:
        yield
        return
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def us(seconds: float) -> float:
    return round(seconds * 1e6, 2)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few seconds: tiny sizes, few repeats (CI)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a loaded machine, 2 OpenMP threads spin and"
                        " get descheduled, which makes times erratic)")
    p.add_argument("--out", default=None,
                   help="directory for the JSON and markdown results (default benchmarks/results,"
                        " or benchmarks/results/quick with --quick)")
    return p


def set_threads(args: argparse.Namespace) -> None:
    """Fix torch's thread count (also for subprocesses started by the benchmark)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)


class Clock:
    """Wall time and process CPU time, read together. On a machine shared with other work,
    CPU time (all threads of this process) is what the code costs; wall time adds the time
    the scheduler gave to other processes."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def status_kb(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS; False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        path = Path(args.out)
    else:
        path = RESULTS / "quick" if args.quick else RESULTS
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(args: argparse.Namespace, name: str, payload: dict[str, Any], markdown: str) -> Path:
    """Write ``name``.json and ``name``.md; returns the JSON path."""
    directory = out_dir(args)
    payload = {"benchmark": name, "quick": bool(args.quick), "environment": environment(), **payload,
               "loadavg_at_end": loadavg()}
    json_path = directory / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    header = (f"<!-- written by benchmarks/{name}.py{' --quick' if args.quick else ''};"
              f" load average at start {payload['environment']['loadavg_at_start']},"
              f" at end {payload['loadavg_at_end']} on {payload['environment']['cpu_count']} CPUs -->\n")
    (directory / f"{name}.md").write_text(header + markdown.rstrip() + "\n")
    print(markdown)
    print(f"\nwrote {json_path} and {json_path.with_suffix('.md')}")
    return json_path
