"""Tokenise a split once into an Arrow file that later runs memory-map.

A data plugin hands over the split as a ``datasets.Dataset`` of raw text and labels (built only
when the cache has no usable file); ``datasets.map`` tokenises it batch by batch into
``<cache>/tokens/<task>-<split>-<key>.arrow``, and the run reads that file memory-mapped, so
neither tokenising nor training holds the split in Python objects. The key covers the data's
origin (whatever the plugin says identifies it), the tokenizer (class, name and whole vocabulary),
the text columns and ``max_length``. kdframe keys the file itself rather than using the
fingerprint ``datasets`` derives by pickling the tokenising function: that pickle includes the
tokenizer, which is slow to hash and not stable across processes, so the cache would miss.

A cached file is checked before use (columns and types, label range, token ids within the
vocabulary, token columns as long as the ids); one that fails is built again, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdframe.errors import DataError
from kdframe.types import TaskInfo, TokenizedSplit

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

FORMAT = 1  # bump when the file layout changes: old files then get other keys
#: A batch of label values (already checked) and the label column's ``datasets`` feature (a
#: ClassLabel names its ids) to class ids or scores.
LabelIds = Callable[[list[Any], Any], list[Any]]


def tokenizer_identity(tokenizer: Any) -> str:
    """Class, origin and the whole vocabulary (what makes two tokenizers give the same ids)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return "|".join([type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), str(len(vocab)),
                     _sha(sorted(vocab.items()))])


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def tokenize_to_arrow(task: TaskInfo, split: str, *, origin: Any, build: Callable[[], datasets.Dataset],
                      text_columns: Sequence[str], tokenizer: Any, max_length: int, cache_dir: str | Path,
                      label_column: str = "labels", label_ids: LabelIds | None = None, where: str = "",
                      source: str = "") -> TokenizedSplit:
    """``split`` of ``task`` tokenised, from the cache when it holds a usable file for ``origin``.

    ``build()`` gives the raw split: ``text_columns`` (one, or two for pairs) and ``label_column``.
    Labels are class ids (scores for regression) unless ``label_ids`` maps them. ``where`` names
    the data in errors (a file, a hub dataset); ``source`` is shown in run summaries.
    """
    key = {"format": FORMAT, "origin": origin, "tokenizer": tokenizer_identity(tokenizer),
           "text_columns": list(text_columns), "max_length": max_length}
    digest = _sha(key)[:24]
    file = Path(cache_dir) / "tokens" / f"{task.name}-{split}-{digest}.arrow"
    features = _features(task, token_outputs(tokenizer, len(text_columns)))
    table = _read_cached(file, task, features, len(tokenizer))
    if table is None:
        raw = build()
        check_columns(raw, text_columns, label_column, where or str(origin))
        encode = _encoder(text_columns, list(features)[:-1], label_column, raw.features[label_column], tokenizer,
                          max_length, label_ids)
        table = _tokenize(raw, encode, features, file, digest, f"tokenising {task.name} {split}")
    return TokenizedSplit(task, split, table, source)


def check_columns(raw: datasets.Dataset, text_columns: Sequence[str], label_column: str, where: str) -> None:
    """The split has rows, the label column, and text in every row of its text columns (rows are
    numbered from 1 in the order of ``raw``)."""
    import pyarrow.compute as pc

    missing = [c for c in (*text_columns, label_column) if c not in raw.column_names]
    if missing:
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))}; it has {', '.join(raw.column_names)}")
    if len(raw) == 0:
        raise DataError(f"{where}: the split is empty (no example rows)")
    for column in text_columns:
        dtype = getattr(raw.features[column], "dtype", type(raw.features[column]).__name__)
        if dtype not in ("string", "large_string"):
            raise DataError(f"{where}: column {column!r} holds {dtype}, not text; text_columns must name text columns")
        values = raw.data.table.column(column)
        if values.null_count:  # a blank CSV field, a JSON null
            raise DataError(f"{where}: row {first_true(pc.is_null(values)) + 1}: column {column!r} is empty")
    if raw.data.table.column(label_column).null_count:
        raise DataError(f"{where}: row {first_true(pc.is_null(raw.data.table.column(label_column))) + 1}:"
                        f" no label in column {label_column!r}")


def first_true(mask: pa.ChunkedArray | pa.Array) -> int:
    """The 0-based position of the first true value of a boolean Arrow array (-1 if none)."""
    import pyarrow.compute as pc

    return pc.index(mask, True).as_py()


def token_outputs(tokenizer: Any, texts: int) -> list[str]:
    """The per-token model inputs ``tokenizer`` gives for ``texts`` text columns, ``input_ids``
    first; the ``attention_mask`` is left out (batches build it from the lengths)."""
    probe = tokenizer(*(["a"] * texts))
    return ["input_ids", *sorted(name for name in probe if name not in ("input_ids", "attention_mask"))]


def _encoder(text_columns: Sequence[str], token_columns: list[str], label_column: str, label_feature: Any,
             tokenizer: Any, max_length: int, label_ids: LabelIds | None) -> Callable[[dict[str, list]], dict[str, list]]:
    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=max_length)
        labels = batch[label_column]
        return {**{name: encoded[name] for name in token_columns},
                "labels": label_ids(labels, label_feature) if label_ids else labels}
    return encode


def _features(task: TaskInfo, token_columns: list[str]) -> datasets.Features:
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({**dict.fromkeys(token_columns, ids),
                              "labels": datasets.Value("float64" if task.is_regression else "int64")})


def _tokenize(raw: datasets.Dataset, encode: Callable, features: datasets.Features, file: Path, digest: str,
              desc: str) -> pa.Table:
    import datasets

    options = {"batched": True, "remove_columns": raw.column_names, "features": features,
               "new_fingerprint": digest, "desc": desc}
    with quiet_progress():
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            out = raw.map(encode, cache_file_name=str(file), load_from_cache_file=False, **options)
        except OSError as exc:  # a read-only cache costs speed, not correctness
            warnings.warn(f"kdframe: cannot write the tokenised split to {file} ({exc}); keeping it in memory",
                          stacklevel=3)
            out = raw.map(encode, keep_in_memory=True, **options)
    return out.data.table


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """``datasets``' progress bars only on a terminal: redrawn into a log file they are noise."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _read_cached(file: Path, task: TaskInfo, features: datasets.Features, vocab_size: int) -> pa.Table | None:
    """The cached table, or None when missing or unusable (then it is removed and rebuilt)."""
    if not file.is_file():
        return None
    import datasets
    import pyarrow.compute as pc

    try:
        table = datasets.Dataset.from_file(str(file)).data.table
        if table.num_rows == 0 or table.schema != features.arrow_schema:
            raise ValueError("other columns")
        ids = pc.list_flatten(table.column("input_ids"))
        low, high = pc.min_max(ids).values() if len(ids) else (0, 0)
        labels = table.column("labels")
        if task.is_regression:
            usable = pc.all(pc.is_finite(labels)).as_py()
        else:
            least, most = pc.min_max(labels).values()
            usable = 0 <= least.as_py() and most.as_py() < task.num_labels
        lengths = pc.list_value_length(table.column("input_ids"))
        lengths_agree = all(pc.all(pc.equal(lengths, pc.list_value_length(table.column(name)))).as_py()
                            for name in list(features)[1:-1])
        if usable and lengths_agree and 0 <= _as_int(low) and _as_int(high) < vocab_size:
            return table
    except Exception:  # noqa: BLE001 - any unreadable file is rebuilt, whatever the reader raised
        pass
    with contextlib.suppress(OSError):
        file.unlink()
    return None


def _as_int(value: Any) -> int:
    return value if isinstance(value, int) else value.as_py()
