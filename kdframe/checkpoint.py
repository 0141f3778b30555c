"""Checkpoints: the typed training state, its file format, atomic writes, RNG state.

``checkpoint.pt`` in a run directory is one of two shapes, both a plain dict of tensors and plain
data (``torch.load(weights_only=True)`` reads it; nothing in it can run code):

- a stage in progress (``Checkpoint.stage`` set): the stage's model, extra modules (W_h),
  optimizer, scheduler, layer weights, plugin state, RNG states and position in the data;
- the boundary after a finished stage (``stage`` None): the student's weights, and the index of
  the next stage, which starts with a fresh optimizer.

Format 1 (before the ``format`` key existed) has the same layout and is read as it is; format 3
adds ``stopped`` to the stage's position (older files read as not stopped). A newer format than
this kdframe knows is refused with a message.
"""

from __future__ import annotations

import hashlib
import os
import random
import zipfile
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from kdframe.errors import KdframeError
from kdframe.fileio import atomic_write

FORMAT = 3


@attrs.define
class StageProgress:
    """Where a stage stands; saved in every checkpoint of the stage, restored on resume."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of the current epoch done
    best: dict[str, float] | None = None  # the best dev metrics so far, and their step
    best_step: int = 0
    skipped: int = 0  # non-finite steps skipped (nonfinite = "skip")
    last_eval: dict[str, float] | None = None
    elapsed_s: float = 0.0  # training time of the stage up to this checkpoint, over every session of the run
    stopped: str = ""  # why a plugin ended the stage early (kdframe.api.Control); empty: it runs on


@attrs.frozen
class StageState:
    """A stage in progress: what its loop needs to continue exactly as if it had not stopped."""

    key: str  # the stage's name (or the teacher's key)
    index: int  # its position in the recipe (-1: the teacher's fine-tuning)
    extra: dict[str, dict[str, torch.Tensor]]  # the strategies' trainable modules (W_h)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    weights: dict[str, list[torch.Tensor]]  # layer weights per cost kind: [student, teacher]
    progress: StageProgress
    plugins: dict[str, Any]  # kdframe_state_dict
    rng: dict[str, Any]


@attrs.frozen
class Checkpoint:
    stage_index: int  # the stage in progress, or (at a boundary) the next stage to run
    model: dict[str, torch.Tensor]  # the student's weights (the teacher's during its fine-tuning)
    summaries: dict[str, Any]  # summaries of the stages finished so far
    stage: StageState | None = None
    elapsed_s: float = 0.0  # the run's time up to this checkpoint, over every session

    def to_file(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "stage": None, "stage_index": self.stage_index,
                               "model": self.model, "summaries": self.summaries, "elapsed_s": self.elapsed_s}
        if self.stage is not None:
            s = self.stage
            out.update(stage=s.key, extra=s.extra, optimizer=s.optimizer, scheduler=s.scheduler, weights=s.weights,
                       position=attrs.asdict(s.progress), plugins=s.plugins, rng=s.rng)
        return out

    @classmethod
    def from_file(cls, raw: Any, path: Path) -> Checkpoint:
        version = raw.get("format", 1) if isinstance(raw, dict) else None
        if not isinstance(version, int) or version > FORMAT:
            newer = f"format {version}, this kdframe reads formats 1 to {FORMAT}: update kdframe" \
                if isinstance(version, int) else "not a kdframe checkpoint"
            raise KdframeError(f"checkpoint {path} cannot be resumed ({newer})")
        try:
            stage = None
            if raw["stage"] is not None:
                stage = StageState(raw["stage"], raw["stage_index"], raw["extra"], raw["optimizer"], raw["scheduler"],
                                   raw["weights"], StageProgress(**raw["position"]), raw["plugins"], raw["rng"])
            return cls(raw["stage_index"], raw["model"], dict(raw["summaries"]), stage, raw.get("elapsed_s", 0.0))
        except (KeyError, TypeError) as exc:
            raise KdframeError(f"checkpoint {path} is not a kdframe run checkpoint ({type(exc).__name__}: {exc})") from None


def save(obj: Any, path: Path) -> None:
    """A kill at any point leaves either the old file or the new one, never a torn file."""
    atomic_write(path, lambda handle: torch.save(obj, handle), durable=True)


def previous(path: Path) -> Path:
    """Where the generation before ``path`` is kept (``checkpoint.prev.pt``)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_generation(obj: Any, path: Path) -> None:
    """Write ``path`` keeping the file it replaces as ``previous(path)``, and only once the new
    one is complete (every member of its zip reads back with the right CRC): a checkpoint that
    turns out corrupt later still has a good predecessor."""

    def keep_the_old_one(written: Path) -> None:
        with zipfile.ZipFile(written) as zipped:
            broken = zipped.testzip()
        if broken is not None:
            raise KdframeError(f"checkpoint {path}: the new file came back corrupt ({broken}); the previous one is kept")
        if path.exists():
            os.replace(path, previous(path))

    atomic_write(path, lambda handle: torch.save(obj, handle), durable=True, before_replace=keep_the_old_one)


def load_checkpoint(path: Path) -> tuple[Checkpoint, str | None]:
    """The latest good checkpoint: ``path``, or when it cannot be read the previous generation;
    with a note saying so (None when ``path`` was good)."""
    try:
        raw, note = load(path), None
    except KdframeError as exc:  # torn or corrupt (a newer format is read, and refused, below)
        older = previous(path)
        if not older.exists():
            raise
        raw, path, note = load(older), older, f"{exc}; resuming from the previous checkpoint {older} instead"
    return Checkpoint.from_file(raw, path), note


def has_checkpoint(path: Path) -> bool:
    return path.exists() or previous(path).exists()


def load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KdframeError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # torn or foreign file: bad input, not a crash
        # torch's own text runs to many lines and suggests weights_only=False: keep its first sentence.
        reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
        raise KdframeError(f"checkpoint {path} cannot be loaded: it is truncated, corrupt or not a kdframe"
                           f" checkpoint (tensors and plain data only) ({type(exc).__name__}: {reason})") from None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict: names, dtypes, shapes and the raw bytes of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
