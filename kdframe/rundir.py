"""The run directory: resolved recipe, environment, JSONL logs, checkpoints, summary."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from kdframe.errors import KdframeError
from kdframe.fileio import atomic_write_text, iter_jsonl

RECIPE = "recipe.resolved.toml"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"  # train records and dev evaluations, one JSON object per line
LAYER_WEIGHTS = "layer_weights.jsonl"  # layer weights and flows per cost kind, every log_every steps
PROGRESS = "progress.json"  # kdframe.progress: the current stage's step, rewritten as it trains
RUN_LOCK = ".kdframe.lock"  # held by the process writing the run (kdframe.fileio.exclusive_use)
TEACHER_SOURCE = "teacher.json"  # where teacher.pt came from (cache, fine-tuned, as loaded): kept for resumes
#: The stage key of the teacher's fine-tuning in logs, checkpoints and best-*.pt (never a student stage's name).
TEACHER = "teacher"


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
    def open_for_resume(cls, path: Path, same_recipe: Callable[[Path], bool]) -> "RunDir":
        """An earlier run to continue; ``same_recipe(stored)`` says whether the recipe file it was
        made with means what the recipe given now means."""
        stored = path / RECIPE
        if not stored.is_file():
            raise KdframeError(f"--resume {path}: not a kdframe run directory (no {RECIPE})")
        if not same_recipe(stored):
            raise KdframeError(
                f"--resume {path}: the run was made with a different recipe; compare {stored}"
                " with the recipe and --set options given now"
            )
        return cls(path)

    def write_text(self, name: str, text: str) -> None:
        if not self.writes:
            return
        atomic_write_text(self.path / name, text)

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
        for name in (METRICS, LAYER_WEIGHTS):
            if (self.path / name).exists():
                kept = [r for r in iter_jsonl(self.path / name)
                        if not (r.get("stage") == stage_key and r.get("step", 0) > step)]
                self.write_text(name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def write_env(self, seed: int, device: str, plugins: list[dict[str, str]]) -> None:
        import torch

        self.write_json("env.json", {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "torch": torch.__version__,
            "packages": _dependency_versions(),
            "seed": seed,
            "device": device,
            "threads": torch.get_num_threads(),
            "plugins": plugins,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })


def _dependency_versions() -> dict[str, str]:
    """The installed version of every package kdframe depends on (its packaging metadata)."""
    import importlib.metadata
    import re

    versions = {}
    for requirement in importlib.metadata.requires("kdframe") or []:
        if "extra ==" in requirement:
            continue  # optional extras (test tools)
        name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
