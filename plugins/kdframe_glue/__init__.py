"""GLUE tasks for kdframe: the ``glue`` data source, its ten tasks, TSV or hub loading into the
token cache. Their metrics are computed by the ``text`` plugin (kdframe_text.metrics).

Local data is read from ``<glue_dir>/<TASK>/{train,dev}.tsv`` as the GLUE download script writes
it; an empty ``glue_dir`` loads ``nyu-mll/glue`` from the Hugging Face hub instead.
"""

from __future__ import annotations

from typing import Any

import attrs

from kdframe.api import Registry, TaskInfo, TokenizedSplit, hookimpl, path_field

from kdframe_glue.loading import data_fingerprint, load_split
from kdframe_glue.tasks import TASKS

SOURCE = "glue"


@attrs.frozen
class GlueParams:
    """The ``glue`` source's keys of ``[data]``."""

    glue_dir: str = path_field("dir")  # a GLUE directory (TSV layout); empty loads nyu-mll/glue from the hub


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add_data_source(SOURCE, params=GlueParams,
                             description="GLUE: TSV files in the GLUE layout, or nyu-mll/glue from the hub")
    for task in TASKS.values():
        registry.add_task(task.info, source=SOURCE)


@hookimpl
def kdframe_load_data(data: Any, task: TaskInfo, split: str, tokenizer: Any,
                      cache_dir: str) -> TokenizedSplit | None:
    if data.source != SOURCE:
        return None
    return load_split(data, TASKS[task.name], split, tokenizer, cache_dir)


@hookimpl
def kdframe_data_fingerprint(data: Any) -> str | None:
    return data_fingerprint(data, TASKS[data.task]) if data.source == SOURCE else None
