"""The ``text`` source's keys of ``[data]``, and the task a recipe defines with them."""

from __future__ import annotations

import math
from typing import Any

import attrs

from kdframe.api import MAX_SEED, RecipeError, TaskInfo, bounded, path_field

#: What ``metrics`` may name (kdframe_text.metrics computes them); pearson and spearman compare scores.
METRIC_NAMES = ("accuracy", "f1", "macro_f1", "matthews", "pearson", "spearman")
SCORE_METRICS = ("pearson", "spearman")
#: File formats by extension, read by the ``datasets`` builder of that name.
FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@attrs.frozen
class TextParams:
    """``source = "text"``: examples from local files, a ``save_to_disk`` directory or a hub dataset."""

    train_file: str = path_field("file")  # training examples: a .csv, .tsv, .jsonl/.json or .parquet file (or package:MODULE/PATH)
    dev_file: str = path_field("file")  # dev examples, in a file like train_file; empty: dev_fraction of train
    dataset: str = path_field("location")  # instead of files: a hub dataset id, or a directory written by Dataset(Dict).save_to_disk
    config: str = ""  # the hub dataset's configuration (subset); empty: its default
    revision: str = ""  # a hub branch, tag or commit; pin one, for the hub's data can change
    train_split: str = "train"  # the split of dataset trained on
    dev_split: str = "validation"  # the split of dataset evaluated on (unless dev_fraction > 0)
    dev_fraction: float = bounded(0.0, ge=0, lt=1)  # > 0: this share of the training rows, held out, is the dev split
    split_seed: int = bounded(0, ge=0, le=MAX_SEED)  # which rows dev_fraction holds out
    where: dict[str, list[str]] = attrs.Factory(dict)  # keep only rows whose column holds one of these values (compared as text)
    text_columns: list[str] = attrs.Factory(lambda: ["sentence"])  # one text column, or two for sentence pairs
    label_column: str = "label"  # the column of labels (or scores)
    labels: list[str] = attrs.Factory(list)  # the label set in id order, as the data writes them (compared as text)
    label_names: list[str] = attrs.Factory(list)  # what each label means, in id order; empty: the labels
    score_range: list[float] = attrs.Factory(list)  # regression instead of labels: [lowest, highest] score
    metrics: list[str] = attrs.Factory(lambda: ["accuracy"])  # of accuracy, f1, macro_f1, matthews, pearson, spearman
    main_metric: str = ""  # the metric that picks the best model; empty: the first of metrics


#: The keys that say where the examples are; datasets handed to kdframe.run replace them.
LOCATION_KEYS = ("train_file", "dev_file", "dataset", "config", "revision", "train_split", "dev_split")


def in_memory(params: dict[str, Any], name: str, splits: list[str]) -> dict[str, Any]:
    """The keys that read the datasets ``name`` (kdframe.memory) instead of the recipe's files or hub
    dataset; columns, labels, metrics and ``where`` stay as the recipe says."""
    kept = {key: value for key, value in params.items() if key not in LOCATION_KEYS}
    kept.update(dataset=name, train_split="train")
    if "dev" in splits:
        kept.update(dev_split="dev", dev_fraction=0.0)
    elif not kept.get("dev_fraction"):
        raise RecipeError(["dev_fraction: no dev dataset was given; pass dev=... or hold out a share of train"
                           " with data.dev_fraction"])
    return kept


def task_info(name: str, params: TextParams) -> TaskInfo:
    """The task ``params`` define, named ``name``; every problem at once as a RecipeError."""
    problems = _source_problems(params) + _column_problems(params) + _label_problems(params)
    problems += _metric_problems(params)
    if problems:
        raise RecipeError(problems)
    return TaskInfo(name, num_labels=len(params.labels) or 1, metrics=tuple(params.metrics),
                    main_metric=params.main_metric or params.metrics[0], text_columns=tuple(params.text_columns),
                    labels=tuple(params.labels), label_names=tuple(params.label_names))


def _source_problems(p: TextParams) -> list[str]:
    problems = []
    if bool(p.train_file) == bool(p.dataset):
        problems.append("train_file: give either train_file (and dev_file or dev_fraction) for local files, or"
                        " dataset for a hub dataset or a save_to_disk directory")
    for key in ("train_file", "dev_file"):
        value = getattr(p, key)
        suffix = "." + value.rsplit(".", 1)[-1].lower() if "." in value.rsplit("/", 1)[-1] else ""
        if value and suffix not in FORMATS:
            problems.append(f"{key}: {value!r} is not a file kdframe reads; the name must end in"
                            f" {', '.join(FORMATS)}")
    if p.dataset and p.dev_file:
        problems.append("dev_file: only with train_file; with dataset, the dev examples are dev_split (or dev_fraction)")
    if p.train_file and not p.dev_file and p.dev_fraction == 0:
        problems.append("dev_file: give the dev examples' file, or hold out a share of train with dev_fraction")
    if p.dev_file and p.dev_fraction > 0:
        problems.append("dev_fraction: the dev examples are dev_file already; set dev_fraction = 0 or drop dev_file")
    if p.train_file and (p.config or p.revision):
        problems.append(f"{'config' if p.config else 'revision'}: only with dataset (a hub dataset)")
    if p.dataset and not p.train_split:
        problems.append("train_split: name the split of dataset to train on")
    if p.dataset and not p.dev_split and p.dev_fraction == 0:
        problems.append("dev_split: name the split of dataset to evaluate on, or hold out a share of train with dev_fraction")
    for column, values in p.where.items():
        if not values:
            problems.append(f"where.{column}: an empty list keeps no row; list the values to keep")
    return problems


def _column_problems(p: TextParams) -> list[str]:
    problems = []
    if len(p.text_columns) not in (1, 2) or len(set(p.text_columns)) != len(p.text_columns):
        problems.append(f"text_columns: name one text column, or two different ones for sentence pairs;"
                        f" got {p.text_columns}")
    if p.label_column in p.text_columns:
        problems.append(f"label_column: {p.label_column!r} is also a text column")
    return problems


def _label_problems(p: TextParams) -> list[str]:
    if p.score_range:
        problems = [] if not p.labels else ["labels: a task has labels or a score_range (regression), not both"]
        if len(p.score_range) != 2 or not all(math.isfinite(x) for x in p.score_range) \
                or p.score_range[0] >= p.score_range[1]:
            problems.append(f"score_range: give [lowest, highest], two finite numbers in order; got {p.score_range}")
        if p.label_names:
            problems.append("label_names: a regression task (score_range) has no labels to name")
        return problems
    problems = []
    if len(p.labels) < 2:
        problems.append("labels: list the label set in id order, as the data writes the labels (at least two,"
                        ' e.g. labels = ["negative", "positive"]), or give score_range for regression')
    duplicates = sorted({label for label in p.labels if p.labels.count(label) > 1})
    if duplicates:
        problems.append(f"labels: {', '.join(map(repr, duplicates))} listed twice")
    if p.label_names and len(p.label_names) != len(p.labels):
        problems.append(f"label_names: {len(p.label_names)} names for {len(p.labels)} labels; give one per label,"
                        " or none")
    return problems


def _metric_problems(p: TextParams) -> list[str]:
    if not p.metrics:
        return [f"metrics: name at least one of {', '.join(METRIC_NAMES)}"]
    problems = [f"metrics: unknown metric {m!r}; known: {', '.join(METRIC_NAMES)}" for m in p.metrics
                if m not in METRIC_NAMES]
    regression = bool(p.score_range)
    wrong = [m for m in p.metrics if m in METRIC_NAMES and (m in SCORE_METRICS) != regression]
    if wrong:
        fits = [m for m in METRIC_NAMES if (m in SCORE_METRICS) == regression]
        problems.append(f"metrics: {', '.join(wrong)} cannot score a {'regression' if regression else 'classification'}"
                        f" task; use {', '.join(fits)}")
    if "f1" in p.metrics and len(p.labels) > 2:
        problems.append(f"metrics: f1 is the F1 of label 1 of two; with {len(p.labels)} labels use macro_f1")
    if p.main_metric and p.main_metric not in p.metrics:
        problems.append(f"main_metric: {p.main_metric!r} is not one of metrics ({', '.join(p.metrics)})")
    return problems
