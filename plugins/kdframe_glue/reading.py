"""Read one GLUE split into texts and labels, from the GLUE TSV files or from the hub."""

from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kdframe.api import DataError, unreachable

from kdframe_glue.tasks import HUB_ID, GlueTask


@dataclass
class Examples:
    texts: tuple[list[str], ...]  # one list per text column (text_a, and text_b for pairs)
    labels: list[int] | list[float]

    def head(self, limit: int) -> Examples:
        """The first ``limit`` examples; all of them when ``limit`` is 0."""
        if limit <= 0:
            return self
        return Examples(tuple(column[:limit] for column in self.texts), self.labels[:limit])


# -- local TSV files ----------------------------------------------------------------------

def tsv_path(glue_dir: str, task: GlueTask, split: str) -> Path:
    """The split's file; a DataError shows the expected layout and what is there instead."""
    path = Path(glue_dir) / task.folder / task.file_name(split)
    if path.is_file():
        return path
    near = path.parent if path.parent.is_dir() else Path(glue_dir)
    if near.is_dir():
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in near.iterdir())
        found = f"{near} holds: {', '.join(held) or 'nothing'}"
    else:
        found = f"{near} does not exist"
    raise DataError(
        f"{path}: file not found; data.glue_dir must have the GLUE layout "
        f"<glue_dir>/{task.folder}/{{train,{task.dev}}}.tsv ({found})"
    )


def read_tsv(path: Path, task: GlueTask) -> Examples:
    """Parse a GLUE TSV with QUOTE_NONE: GLUE fields may begin with '"' and must stay verbatim."""
    texts: tuple[list[str], ...] = tuple([] for _ in task.text_at)
    labels: list = []
    width = task.headerless_columns
    needed = max(*task.text_at, task.label_at) + 1  # a negative label_at counts from the end
    parse_label = _label_parser(task)
    # utf-8-sig drops the BOM the download script writes; newline="" lets csv handle CRLF.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            for row in reader:
                if not row:  # a blank line (e.g. a trailing one) holds no example
                    continue
                if width is None:  # the header fixes the column count (MNLI dev has more than train)
                    width = len(row)
                    if width < needed:
                        raise DataError(f"{path}:{reader.line_num}: the header has {width} tab-separated columns;"
                                        f" {task.folder} files need at least {needed} (text in column"
                                        f" {', '.join(str(a + 1) for a in task.text_at)}, the label in"
                                        f" {'the last' if task.label_at < 0 else task.label_at + 1})")
                    continue
                if len(row) != width:
                    expected = ("as in the header" if task.headerless_columns is None
                                else f"{task.folder} files have no header")
                    raise DataError(f"{path}:{reader.line_num}: expected {width} tab-separated columns "
                                    f"({expected}), found {len(row)}")
                for column, at in zip(texts, task.text_at):
                    column.append(row[at])
                try:
                    labels.append(parse_label(row[task.label_at]))
                except ValueError as exc:
                    at = task.label_at % width + 1
                    raise DataError(f"{path}:{reader.line_num}: column {at}: {exc}") from None
        except UnicodeDecodeError as exc:  # decoded in chunks, so reader.line_num lags: find the line
            raise DataError(f"{path}: not UTF-8 text at line {_first_non_utf8_line(path)} ({exc.reason})") from None
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: {exc}") from None
    if not labels:
        raise DataError(f"{path}: the split is empty (no example rows)")
    return Examples(texts, labels)


def _first_non_utf8_line(path: Path) -> int:
    """The 1-based number of the first line that is not valid UTF-8 (0 if none is)."""
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return number
    return 0


def _label_parser(task: GlueTask) -> Callable[[str], float]:
    """A function from a TSV label value to its id (a score for STS-B); ValueError says what is wrong."""
    if task.info.is_regression:
        def score(value: str) -> float:
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise ValueError(f"score {value!r} is not a number")
            return number
        return score

    ids = {value: i for i, value in enumerate(task.info.labels)}

    def label(value: str) -> int:
        if value not in ids:
            raise ValueError(f"unknown label {value!r}; allowed: {', '.join(task.info.labels)}")
        return ids[value]
    return label


# -- the hub ------------------------------------------------------------------------------

@contextlib.contextmanager
def _offline_mode(offline: bool) -> Iterator[None]:
    """datasets and huggingface_hub read their offline switch once, at import: set it for one call."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = offline or saved[0]
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def hub_name(task: GlueTask, split: str) -> str:
    return f"{HUB_ID} ({task.hub_config}, {task.hub_split(split)})"


def read_hub(task: GlueTask, split: str) -> Examples:
    import datasets  # imported here: slow to import, and only the hub path needs it

    name = hub_name(task, split)
    offline = unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    try:
        with _offline_mode(offline is not None):  # the local cache only: an error in a second, not after retries
            ds = datasets.load_dataset(HUB_ID, task.hub_config, split=task.hub_split(split))
    except Exception as exc:  # offline, no cached copy, hub or auth errors: the remedy is the same
        reason = (f"the Hugging Face hub cannot be reached ({offline}) and it is not in the local datasets cache"
                  if offline is not None else f"{type(exc).__name__}: {exc}")
        raise DataError(f"cannot load {name}: {reason}. Without the hub, set data.glue_dir to a directory in the GLUE"
                        f" layout (<glue_dir>/{task.folder}/train.tsv ...)") from None
    missing = [c for c in (*task.info.text_columns, "label") if c not in ds.column_names]
    if missing:
        raise DataError(f"{name}: missing columns {', '.join(missing)}; it has {', '.join(ds.column_names)}")
    if len(ds) == 0:
        raise DataError(f"{name}: the split is empty")
    texts = tuple(list(ds[c]) for c in task.info.text_columns)
    if task.info.is_regression:
        return Examples(texts, [float(y) for y in ds["label"]])
    labels = [int(y) for y in ds["label"]]
    for row, y in enumerate(labels, 1):
        if not 0 <= y < task.info.num_labels:  # e.g. -1, the hub's mark for unlabelled test rows
            raise DataError(f"{name}: row {row} has label {y}; expected 0..{task.info.num_labels - 1}")
    return Examples(texts, labels)
