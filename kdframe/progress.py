"""Progress display for long stages: a rich bar, plain lines, or nothing."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    def __init__(self, mode: str):
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "off"
        self.mode = mode
        self._bar: Any = None
        self._task: Any = None
        self._started = 0.0
        self._total = 0

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
        self._label = label

    def update(self, step: int, info: str, every: int) -> None:
        if self.mode == "rich":
            self._bar.update(self._task, completed=step, info=info)
        elif self.mode == "plain" and (step % every == 0 or step == self._total):
            elapsed = time.monotonic() - self._started
            rate = (step - self._first) / elapsed if elapsed > 0 else 0.0
            print(f"[{self._label}] step {step}/{self._total} {info} {rate:.2f} steps/s", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.mode == "rich" and self._bar is not None:
            self._bar.console.print(text)
        elif self.mode != "off":
            print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
