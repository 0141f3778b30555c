"""Read the ``text`` source's examples: local files, a ``save_to_disk`` directory or a hub dataset,
through ``datasets`` (Arrow, memory-mapped), then check them and pick the split's rows.

Every check runs on the whole table, vectorised, so an error names the row as the file numbers
it (data rows from 1, the header not counted), whatever ``where`` and ``dev_fraction`` select.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdframe.api import MEMORY_PREFIX, DataError, check_columns, first_true, load_hub_dataset, memory_object, quiet_progress

from kdframe_text.params import FORMATS, TextParams

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

PACKAGE = "package:"


def role_of(params: TextParams, split: str) -> str:
    """Which examples hold ``split``: ``dev`` (a dev file or dev_split), else ``train`` (the
    training examples, of which dev_fraction may be held out)."""
    return "dev" if split == "dev" and params.dev_fraction == 0 else "train"


def location(params: TextParams, role: str) -> str:
    """The file, directory or hub dataset that holds the ``train`` or ``dev`` examples."""
    if params.train_file:
        return str(local_file(params.train_file if role == "train" else params.dev_file))
    split = params.train_split if role == "train" else params.dev_split
    return f"{params.dataset} ({', '.join(filter(None, [params.config, split]))})"


def split_rows(params: TextParams, split: str, cache_dir: str) -> datasets.Dataset:
    """The examples of ``split`` (``train`` or ``dev``), checked."""
    role = role_of(params, split)
    where = location(params, role)
    raw = read(params, role, cache_dir, where)
    rows = checked_rows(raw, params, where)
    if params.dev_fraction > 0:
        rows = held_out(rows, params, where)[split]
    return raw.select(rows)


def read(params: TextParams, role: str, cache_dir: str, where: str) -> datasets.Dataset:
    """The whole table that holds the ``train`` or ``dev`` examples."""
    if params.train_file:
        return read_file(Path(where), cache_dir)
    split = params.train_split if role == "train" else params.dev_split
    if params.dataset.startswith(MEMORY_PREFIX):
        return memory_object(params.dataset)[split]
    directory = Path(params.dataset)
    if directory.is_dir():
        return read_saved(directory, split, params)
    if params.dataset.startswith(("/", ".", "~")):
        raise DataError(f"{params.dataset}: no such directory (data.dataset is a hub id or a save_to_disk directory)")
    return load_hub_dataset(params.dataset, params.config or None, split=split, revision=params.revision or None,
                            what=where, remedy="Without the hub, save it with save_to_disk (or as CSV/Parquet files)"
                                               " and set data.dataset (or data.train_file) to that")


def local_file(value: str) -> Path:
    """``value`` as a path: ``package:MODULE/PATH`` is PATH inside the installed package MODULE."""
    if value.startswith(PACKAGE):
        module, _, inner = value[len(PACKAGE):].partition("/")
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"{value}: no installed package {module!r} (pip install it, or give a path)")
        path = Path(next(iter(spec.submodule_search_locations))) / inner
    else:
        path = Path(value)
    if not path.is_file():
        held = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else None
        found = f"{path.parent} holds: {', '.join(held) or 'nothing'}" if held is not None else \
            f"{path.parent} does not exist"
        raise DataError(f"{path}: file not found ({found})")
    return path


def read_file(path: Path, cache_dir: str) -> datasets.Dataset:
    """A CSV (TSV: tab-separated, no quoting, as GLUE writes them), JSON lines or Parquet file,
    converted once into ``<cache_dir>/datasets`` by the ``datasets`` builder of its format."""
    import datasets

    suffix = path.suffix.lower()
    options: dict[str, Any] = {"sep": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
    try:
        with quiet_progress():
            return datasets.load_dataset(FORMATS[suffix], data_files=str(path), split="train",
                                         cache_dir=str(Path(cache_dir) / "datasets"), **options)
    except Exception as exc:  # noqa: BLE001 - whatever the builder raised, the file is the problem
        cause = exc.__cause__ if isinstance(exc, datasets.exceptions.DatasetGenerationError) and exc.__cause__ else exc
        if "corresponds to no data" in str(cause):  # the builder's word for a file of no rows
            raise DataError(f"{path}: the split is empty (no example rows)") from None
        detail = str(cause).splitlines()[0] if str(cause) else "no detail"
        raise DataError(f"{path}: does not parse as {suffix[1:].upper()} ({type(cause).__name__}: {detail})") from None


def read_saved(location: Path, split: str, params: TextParams) -> datasets.Dataset:
    """A split of a ``save_to_disk`` directory: of a DatasetDict by name, or a lone Dataset as train."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(location))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{location}: not a directory written by save_to_disk ({exc})") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{location}: no split {split!r}; it has {', '.join(saved)}"
                            " (set data.train_split / data.dev_split)")
        return saved[split]
    if split != params.train_split:
        raise DataError(f"{location}: one dataset with no splits; it is the training data, so hold out dev"
                        " examples with data.dev_fraction")
    return saved


def label_text(values: pa.Array | pa.ChunkedArray, feature: Any) -> pa.Array | pa.ChunkedArray:
    """Label values as text: a ClassLabel's names, anything else cast (1 -> "1", True -> "true")."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = getattr(feature, "names", None)
    if names is not None:
        return pc.take(pa.array(names), values)
    return pc.cast(values, pa.string())


def checked_rows(raw: datasets.Dataset, params: TextParams, where: str) -> np.ndarray:
    """The rows ``params.where`` keeps, once the columns, texts and labels in them are checked."""
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = [c for c in params.where if c not in raw.column_names]
    if missing:
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))} (data.where); it has"
                        f" {', '.join(raw.column_names)}")
    check_columns(raw, params.text_columns, params.label_column, where)
    table = raw.data.table
    keep = pa.array(np.ones(len(table), dtype=bool))
    for column, values in params.where.items():
        keep = pc.and_(keep, pc.fill_null(pc.is_in(label_text(table.column(column), raw.features[column]),
                                                   value_set=pa.array(values)), False))
    if not pc.any(keep).as_py():
        raise DataError(f"{where}: data.where keeps no row")
    labels = table.column(params.label_column)
    if params.score_range:
        if not (pa.types.is_integer(labels.type) or pa.types.is_floating(labels.type)):
            raise DataError(f"{where}: column {params.label_column!r} holds {labels.type}, not scores"
                            " (data.score_range makes this a regression task)")
        low, high = params.score_range
        scores = pc.cast(labels, pa.float64())
        inside = pc.fill_null(pc.and_(pc.greater_equal(scores, low), pc.less_equal(scores, high)), False)
        bad = pc.and_(keep, pc.invert(inside))
        if pc.any(bad).as_py():
            row = first_true(bad)
            raise DataError(f"{where}: row {row + 1}: score {scores[row].as_py()} is outside data.score_range"
                            f" [{low}, {high}]")
    else:
        text = label_text(labels, raw.features[params.label_column])
        bad = pc.and_(keep, pc.invert(pc.fill_null(pc.is_in(text, value_set=pa.array(params.labels)), False)))
        if pc.any(bad).as_py():
            row = first_true(bad)
            raise DataError(f"{where}: row {row + 1}: label {text[row].as_py()!r} is not in data.labels"
                            f" ({', '.join(params.labels)})")
    return np.flatnonzero(keep.to_numpy(zero_copy_only=False))


def held_out(rows: np.ndarray, params: TextParams, where: str) -> dict[str, np.ndarray]:
    """``rows`` split into train and dev: ``dev_fraction`` of them, drawn with ``split_seed``; each
    kept in file order."""
    count = round(params.dev_fraction * len(rows))
    if not 0 < count < len(rows):
        raise DataError(f"{where}: data.dev_fraction = {params.dev_fraction} of {len(rows)} rows holds out"
                        f" {count}; both splits need at least one example")
    order = np.random.default_rng(params.split_seed).permutation(len(rows))
    return {"dev": np.sort(rows[order[:count]]), "train": np.sort(rows[order[count:]])}


def label_ids(params: TextParams) -> Any:
    """Label values to class ids (through the label set) or to scores."""
    if params.score_range:
        return lambda values, feature: [float(v) for v in values]

    def ids(values: list[Any], feature: Any) -> list[int]:
        import pyarrow as pa
        import pyarrow.compute as pc

        return pc.index_in(label_text(pa.array(values), feature), value_set=pa.array(params.labels)).to_pylist()
    return ids


def origin(params: TextParams, split: str, limit: int) -> dict[str, Any]:
    """What the split's examples depend on (keys the token cache): the keys, and the data's files
    by size and modification time, or the hub dataset by name and revision."""
    import attrs

    return {"params": attrs.asdict(params), "split": split, "limit": limit, "files": _file_stamps(params)}


def _file_stamps(params: TextParams) -> list[list[Any]]:
    paths = [local_file(v) for v in (params.train_file, params.dev_file) if v]
    if params.dataset and Path(params.dataset).is_dir():
        paths = sorted(p for p in Path(params.dataset).rglob("*") if p.is_file())
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def fingerprint(params: TextParams) -> str:
    """What the examples hold: a digest of the files' bytes, or the hub dataset's name and revision
    (an unpinned hub dataset is taken as unchanged)."""
    if params.dataset.startswith(MEMORY_PREFIX):
        return params.dataset  # named by a digest of its rows
    if params.dataset and not Path(params.dataset).is_dir():
        return f"hub:{params.dataset}@{params.revision or 'default'}:{params.config}"
    roots = [Path(params.dataset)] if params.dataset else [local_file(v) for v in (params.train_file, params.dev_file) if v]
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
            digest.update(f"{path.relative_to(root) if path != root else ''}\0".encode())  # names within a directory
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
    return f"sha256:{digest.hexdigest()}"
