"""Read one GLUE split into texts and labels, from the GLUE TSV files or from the hub."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdframe.api import DataError

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

def hub_name(task: GlueTask, split: str) -> str:
    return f"{HUB_ID} ({task.hub_config}, {task.hub_split(split)})"


def read_hub(task: GlueTask, split: str) -> Examples:
    import datasets  # imported here: slow to import, and only the hub path needs it

    name = hub_name(task, split)
    try:
        ds = datasets.load_dataset(HUB_ID, task.hub_config, split=task.hub_split(split))
    except Exception as exc:  # offline, no cached copy, hub or auth errors: the remedy is the same
        raise DataError(
            f"cannot load {name}: {type(exc).__name__}: {exc}. Without the hub, set data.glue_dir to a "
            f"directory in the GLUE layout (<glue_dir>/{task.folder}/train.tsv ...)"
        ) from exc
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
