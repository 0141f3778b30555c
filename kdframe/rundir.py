"""The run directory: resolved recipe, environment, JSONL logs, checkpoints, summary."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from kdframe.errors import KdframeError

RECIPE = "recipe.resolved.toml"
CHECKPOINT = "checkpoint.pt"
PROGRESS = "progress.json"  # kdframe.progress: the current stage's step, rewritten as it trains


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def recipe_toml(plain: dict[str, Any]) -> str:
    return tomli_w.dumps(_drop_none(plain))


class RunDir:
    def __init__(self, path: Path, writes: bool = True):
        self.path = path
        # False in the other processes of a multi-process run: only the main process writes files.
        self.writes = writes

    # files
    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def best(self, stage: str) -> Path:
        return self.path / f"best-{stage}.pt"

    @property
    def teacher(self) -> Path:
        return self.path / "teacher.pt"

    @classmethod
    def create(cls, path: Path, recipe_text: str) -> "RunDir":
        """A new run: refuse a directory that holds another run or other files."""
        if path.exists() and not path.is_dir():
            raise KdframeError(f"--out {path} exists and is not a directory")
        try:
            taken = path.exists() and any(path.iterdir())
        except OSError as exc:
            raise KdframeError(f"cannot read run directory {path}: {exc.strerror}") from None
        if taken:
            existing = path / RECIPE
            hint = "use --resume to continue it" if existing.exists() else "choose an empty directory"
            raise KdframeError(f"--out {path} is not empty ({hint})")
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise KdframeError(f"cannot write to run directory {path}: {exc.strerror}") from None
        run = cls(path)
        run.write_text(RECIPE, recipe_text)
        return run

    @classmethod
    def open_for_resume(cls, path: Path, recipe_text: str) -> "RunDir":
        stored = path / RECIPE
        if not stored.is_file():
            raise KdframeError(f"--resume {path}: not a kdframe run directory (no {RECIPE})")
        if stored.read_text() != recipe_text:
            raise KdframeError(
                f"--resume {path}: the run was made with a different recipe; compare {stored}"
                " with the recipe and --set options given now"
            )
        return cls(path)

    def write_text(self, name: str, text: str) -> None:
        if not self.writes:
            return
        target = self.path / name
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        with open(self.path / name, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_logs_after(self, stage_key: str, step: int) -> None:
        """On resume, drop log lines written after the checkpoint so logs equal an unbroken run."""
        if not self.writes:
            return
        for name in ("metrics.jsonl", "layer_weights.jsonl"):
            path = self.path / name
            if not path.exists():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if record.get("stage") == stage_key and record.get("step", 0) > step:
                    continue
                kept.append(line)
            self.write_text(name, "".join(k + "\n" for k in kept))

    def write_env(self, seed: int, device: str, plugins: list[dict[str, str]]) -> None:
        import torch
        import transformers

        self.write_json("env.json", {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "seed": seed,
            "device": device,
            "threads": torch.get_num_threads(),
            "plugins": plugins,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
