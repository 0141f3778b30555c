"""Run every benchmark, each in its own process; ``--quick`` for CI (about two minutes in all).

    python benchmarks/run_all.py --quick --out /tmp/bench     # CI: small sizes, few repeats
    python benchmarks/run_all.py                              # the real run -> benchmarks/results

Each script writes <name>.json and <name>.md into the output directory (default
benchmarks/results, or benchmarks/results/quick with --quick). Exit status 1 when any script
fails or runs past its timeout; the failing script's output tail is printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_transport", "bench_scaling", "bench_capture", "bench_optimizer", "bench_step", "bench_data"]


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="output directory for every script")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated subset of: " + ",".join(SCRIPTS))
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per script (default 300 with --quick, 1800 otherwise)")
    args = p.parse_args(argv)
    scripts = args.only.split(",") if args.only else SCRIPTS
    unknown = sorted(set(scripts) - set(SCRIPTS))
    if unknown:
        p.error(f"unknown script(s) {', '.join(unknown)}; known: {', '.join(SCRIPTS)}")
    timeout = args.timeout or (300 if args.quick else 1800)
    failed = []
    for name in scripts:
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        if args.out:
            cmd += ["--out", args.out]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            status = f"timeout after {timeout:.0f}s"
            tail = (_text(exc.stdout) + _text(exc.stderr))[-3000:]
        print(f"[run_all] {name}: {status} in {time.perf_counter() - started:.1f}s", flush=True)
        if status != "ok":
            failed.append(name)
            print(tail, file=sys.stderr)
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
