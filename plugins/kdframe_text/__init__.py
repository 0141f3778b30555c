"""Any text classification or regression data for kdframe: the ``text`` data source, and the
metrics every task may name (GLUE's included).

A recipe with ``source = "text"`` defines its own task: the text and label columns, the label set
(or a score range), the metrics. Examples come from local CSV, TSV, JSON lines or Parquet files, a
directory written by ``save_to_disk``, or a hub dataset; they are tokenised into kdframe's Arrow
token cache and read memory-mapped.
"""

from __future__ import annotations

from typing import Any

from kdframe.api import Registry, TaskInfo, TokenizedSplit, hookimpl, tokenize_to_arrow

from kdframe_text.params import TextParams, in_memory, task_info

SOURCE = "text"


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add_data_source(SOURCE, params=TextParams, task=task_info, in_memory=in_memory,
                             description="your own task: CSV/TSV/JSON lines/Parquet files, a save_to_disk"
                                         " directory or a hub dataset")


@hookimpl
def kdframe_load_data(data: Any, task: TaskInfo, split: str, tokenizer: Any,
                      cache_dir: str) -> TokenizedSplit | None:
    if data.source != SOURCE:
        return None
    from kdframe_text import reading  # numpy and pyarrow: only once data is read

    params = data.params
    limit = data.train_limit if split == "train" else data.dev_limit
    where = reading.location(params, reading.role_of(params, split))
    held_out = f" ({split} part of dev_fraction {params.dev_fraction}, split_seed {params.split_seed})"

    def build() -> Any:
        raw = reading.split_rows(params, split, cache_dir)
        return raw.select(range(min(limit, len(raw)))) if limit > 0 else raw

    return tokenize_to_arrow(task, split, origin=reading.origin(params, split, limit), build=build,
                             text_columns=params.text_columns, label_column=params.label_column,
                             label_ids=reading.label_ids(params), tokenizer=tokenizer, max_length=data.max_length,
                             cache_dir=cache_dir, where=where,
                             source=where + (held_out if params.dev_fraction > 0 else ""))


@hookimpl
def kdframe_data_fingerprint(data: Any) -> str | None:
    if data.source != SOURCE:
        return None
    from kdframe_text import reading

    return reading.fingerprint(data.params)


@hookimpl(trylast=True)
def kdframe_compute_metrics(task: TaskInfo, predictions: Any, labels: Any) -> dict[str, float] | None:
    from kdframe_text.metrics import METRICS, compute  # numpy and scipy: only once something is scored

    # Any task whose metrics are all known here is served: the text source's, GLUE's, a plugin's.
    if not set(task.metrics) <= METRICS.keys():
        return None
    return compute(task.metrics, predictions, labels)
