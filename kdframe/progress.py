"""Progress display for long stages: a rich bar, plain lines, or nothing; and a status file.

``auto`` draws the bar on a terminal and prints plain lines otherwise (a log file, a job
scheduler, ``nohup``): every ``log_every`` steps and at least once a minute, with the rate and
the time left.

The status file (``progress.json`` in the run directory) holds the current stage's label, step,
total and rate, rewritten atomically at most every few seconds: ``kdframe ablate --jobs`` reads it
to show the progress of cells running quietly in worker processes, and anyone can watch it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from kdframe.fileio import atomic_write_text

STATUS_EVERY_S = 2.0
PLAIN_EVERY_S = 60.0  # plain lines: at least this often, whatever log_every says


class Progress:
    def __init__(self, mode: str):
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "plain"
        self.mode = mode
        self._bar: Any = None
        self._task: Any = None
        self._started = 0.0
        self._total = 0
        self.status_file: Path | None = None
        self._status_at = 0.0
        self._printed_at = 0.0

    def start(self, label: str, total: int, done: int) -> None:
        self._started = time.monotonic()
        self._total = total
        self._first = done
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, completed=done, info="")
        elif self.mode == "plain":
            print(f"[{label}] {done}/{total} steps", file=sys.stderr, flush=True)
            self._printed_at = self._started
        self._label = label
        self._write_status(done, "", force=True)

    def update(self, step: int, info: str, every: int) -> None:
        self._write_status(step, info, force=step == self._total)
        if self.mode == "rich":
            self._bar.update(self._task, completed=step, info=info)
        elif self.mode == "plain":
            now = time.monotonic()
            if step % every == 0 or step == self._total or now - self._printed_at >= PLAIN_EVERY_S:
                rate = self._rate(step)
                left = f", ~{_duration((self._total - step) / rate)} left" if rate > 0 and step < self._total else ""
                print(f"[{self._label}] step {step}/{self._total} {info} ({rate:.2f} steps/s{left})",
                      file=sys.stderr, flush=True)
                self._printed_at = now

    def _rate(self, step: int) -> float:
        elapsed = time.monotonic() - self._started
        return (step - self._first) / elapsed if elapsed > 0 else 0.0

    def _write_status(self, step: int, info: str, force: bool) -> None:
        now = time.monotonic()
        if self.status_file is None or (not force and now - self._status_at < STATUS_EVERY_S):
            return
        self._status_at = now
        status = {"label": self._label, "step": step, "total": self._total, "info": info,
                  "steps_per_s": round(self._rate(step), 3), "time": time.time()}
        atomic_write_text(self.status_file, json.dumps(status))

    def message(self, text: str) -> None:
        if self.mode == "rich" and self._bar is not None:
            self._bar.console.print(text)
        elif self.mode != "off":
            print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
