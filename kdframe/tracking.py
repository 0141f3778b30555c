"""Experiment trackers (recipe section ``[tracking]``): what a run writes to metrics.jsonl and
layer_weights.jsonl also goes to accelerate's trackers (TensorBoard, Weights & Biases, MLflow, ...).

Names in the trackers: ``STAGE/train/NAME`` (loss, lr, each loss term, every ``log_every``
steps; the teacher's fine-tuning is the stage ``teacher``), ``STAGE/dev/METRIC`` (each
evaluation), ``teacher/selected/METRIC`` (the teacher distilled from, at step 0),
``STAGE/layer_weights/KIND/student_I`` and ``.../teacher_J`` (with the training records), and at
the end ``summary/student_best/METRIC`` and ``summary/student_final/METRIC``; steps are the
stage's own. The resolved recipe, flattened (``stages.0.lr``), is the run's configuration
(TensorBoard's hparams). Only the main process logs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

#: Each tracker's Python package (one of them must be installed).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "comet_ml": ("comet_ml",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",),
            "swanlab": ("swanlab",), "trackio": ("trackio",)}


def tracking_problems(spec: Any) -> list[str]:
    """Trackers named twice, or whose package is not installed (a run would fail at its start)."""
    problems = [f"tracking.trackers: {name!r} is named twice" for i, name in enumerate(spec.trackers)
                if name in spec.trackers[:i]]
    for name in dict.fromkeys(spec.trackers):
        if not any(importlib.util.find_spec(package) for package in PACKAGES[name]):
            problems.append(f"tracking.trackers: {name!r} needs the package {' or '.join(PACKAGES[name])}"
                            f" (pip install {PACKAGES[name][0]})")
    return problems


def flat_config(value: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested plain recipe as one level of ``a.b.c`` keys with scalar values (lists as text)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flat_config(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flat_config(item, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value if isinstance(value, (bool, int, float, str)) else str(value)}


class Trackers:
    """A run's trackers (none until ``open``); ``log`` and ``finish`` do nothing without any."""

    def __init__(self) -> None:
        self.trackers: list[Any] = []

    @classmethod
    def open(cls, spec: Any, project: str, run_name: str, logging_dir: Path, config: dict[str, Any],
             main: bool = True) -> Trackers:
        """Start the trackers ``spec`` names and store ``config`` in them (the main process only)."""
        opened = cls()
        if not spec.trackers or not main:
            return opened
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        for name in spec.trackers:
            tracker_class = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":  # one folder per run: <dir>/<project>/<run name>
                tracker = tracker_class(run_name, logging_dir / project)
            elif name == "mlflow":
                tracker = tracker_class(project, str(logging_dir), run_name=run_name)
            elif name == "wandb":
                tracker = tracker_class(project, name=run_name, dir=str(logging_dir))
            elif tracker_class.requires_logging_directory:
                tracker = tracker_class(project, str(logging_dir))
            else:
                tracker = tracker_class(project)
            tracker.start()
            tracker.store_init_configuration(flat_config(config))
            opened.trackers.append(tracker)
        return opened

    def log(self, values: dict[str, Any], step: int) -> None:
        """Send the numbers among ``values`` (booleans and text are left out)."""
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            for tracker in self.trackers:
                tracker.log(numbers, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
