"""GLUE tasks for kdframe: task descriptions, TSV or hub loading with a tokenisation cache, metrics.

Local data is read from ``<glue_dir>/<TASK>/{train,dev}.tsv`` as the GLUE download script writes
it; an empty ``glue_dir`` loads ``nyu-mll/glue`` from the Hugging Face hub instead.
"""

from __future__ import annotations

from typing import Any

from kdframe.api import TaskInfo, TokenizedSplit, hookimpl

from kdframe_glue.loading import data_fingerprint, load_split
from kdframe_glue.metrics import METRICS, compute
from kdframe_glue.tasks import TASKS


@hookimpl
def kdframe_task_names() -> list[str]:
    return list(TASKS)


@hookimpl
def kdframe_task_info(name: str) -> TaskInfo | None:
    task = TASKS.get(name)
    return task.info if task else None


@hookimpl
def kdframe_load_data(data: Any, task: TaskInfo, split: str, tokenizer: Any,
                      cache_dir: str | None) -> TokenizedSplit | None:
    glue = TASKS.get(task.name)
    return load_split(data, glue, split, tokenizer, cache_dir) if glue else None


@hookimpl
def kdframe_data_fingerprint(data: Any) -> str | None:
    glue = TASKS.get(data.task)
    return data_fingerprint(data, glue) if glue else None


@hookimpl
def kdframe_compute_metrics(task: TaskInfo, predictions: Any, labels: Any) -> dict[str, float] | None:
    # Any task whose metrics are all known here is served, not only GLUE's own.
    if not set(task.metrics) <= METRICS.keys():
        return None
    return compute(task.metrics, predictions, labels)
