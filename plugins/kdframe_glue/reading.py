"""Read one GLUE split as a ``datasets.Dataset`` of texts and labels, from the GLUE TSV files or
from the hub. Columns: the task's text columns (named as on the hub) and ``label`` (a class id,
or a score for STS-B)."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kdframe.api import DataError, first_true, load_hub_dataset, quiet_progress

from kdframe_glue.tasks import HUB_ID, TASKS, GlueTask

if TYPE_CHECKING:
    import datasets


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


def read_tsv(path: Path, task: GlueTask, cache_dir: str, fingerprint: str) -> datasets.Dataset:
    """The TSV as a dataset written to ``<cache_dir>/datasets`` row by row (memory stays flat);
    ``fingerprint`` identifies the file's content (an unchanged file is not read again)."""
    import datasets

    features = datasets.Features({**{c: datasets.Value("string") for c in task.info.text_columns},
                                  "label": datasets.Value("float64" if task.info.is_regression else "int64")})
    try:
        with quiet_progress():
            return datasets.Dataset.from_generator(
                tsv_rows, features=features, gen_kwargs={"path": str(path), "task": task.info.name},
                cache_dir=str(Path(cache_dir) / "datasets"), fingerprint=fingerprint)
    except datasets.exceptions.DatasetGenerationError as exc:  # a DataError from tsv_rows, wrapped
        cause = exc.__cause__
        raise (cause if isinstance(cause, DataError) else DataError(f"{path}: {cause or exc}")) from None


def tsv_rows(path: str, task: str) -> Iterator[dict[str, str | float]]:
    """Parse a GLUE TSV with QUOTE_NONE: GLUE fields may begin with '"' and must stay verbatim."""
    glue_task = TASKS[task]
    width = glue_task.headerless_columns
    needed = max(*glue_task.text_at, glue_task.label_at) + 1  # a negative label_at counts from the end
    parse_label = _label_parser(glue_task)
    names = glue_task.info.text_columns
    rows = 0
    # utf-8-sig drops the BOM the download script writes; newline="" lets csv handle CRLF.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            for row in reader:
                if not row:  # a blank line (e.g. a trailing one) holds no example
                    continue
                if width is None:  # the header fixes the column count (MNLI dev has more than train)
                    width = len(row)
                    if width < needed:
                        raise DataError(f"{path}:{reader.line_num}: the header has {width} tab-separated columns;"
                                        f" {glue_task.folder} files need at least {needed} (text in column"
                                        f" {', '.join(str(a + 1) for a in glue_task.text_at)}, the label in"
                                        f" {'the last' if glue_task.label_at < 0 else glue_task.label_at + 1})")
                    continue
                if len(row) != width:
                    expected = ("as in the header" if glue_task.headerless_columns is None
                                else f"{glue_task.folder} files have no header")
                    raise DataError(f"{path}:{reader.line_num}: expected {width} tab-separated columns "
                                    f"({expected}), found {len(row)}")
                try:
                    label = parse_label(row[glue_task.label_at])
                except ValueError as exc:
                    at = glue_task.label_at % width + 1
                    raise DataError(f"{path}:{reader.line_num}: column {at}: {exc}") from None
                rows += 1
                yield {**{name: row[at] for name, at in zip(names, glue_task.text_at)}, "label": label}
        except UnicodeDecodeError as exc:  # decoded in chunks, so reader.line_num lags: find the line
            raise DataError(f"{path}: not UTF-8 text at line {_first_non_utf8_line(Path(path))} ({exc.reason})") from None
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: {exc}") from None
    if not rows:
        raise DataError(f"{path}: the split is empty (no example rows)")


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


def read_hub(task: GlueTask, split: str) -> datasets.Dataset:
    name = hub_name(task, split)
    ds = load_hub_dataset(HUB_ID, task.hub_config, split=task.hub_split(split), what=name,
                          remedy=f"Without the hub, set data.glue_dir to a directory in the GLUE layout"
                                 f" (<glue_dir>/{task.folder}/train.tsv ...)")
    missing = [c for c in (*task.info.text_columns, "label") if c not in ds.column_names]
    if missing:
        raise DataError(f"{name}: missing columns {', '.join(missing)}; it has {', '.join(ds.column_names)}")
    if len(ds) == 0:
        raise DataError(f"{name}: the split is empty")
    if not task.info.is_regression:
        import pyarrow.compute as pc

        labels = ds.data.table.column("label")
        outside = pc.or_(pc.less(labels, 0), pc.greater_equal(labels, task.info.num_labels))
        if pc.any(outside).as_py():  # e.g. -1, the hub's mark for unlabelled test rows
            row = first_true(outside)
            raise DataError(f"{name}: row {row + 1} has label {labels[row].as_py()};"
                            f" expected 0..{task.info.num_labels - 1}")
    return ds
