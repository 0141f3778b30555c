"""Tokenise a GLUE split, with an on-disk cache so that repeated runs skip parsing and tokenising."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from kdframe.api import TaskInfo, TokenizedSplit, atomic_write

from kdframe_glue.reading import Examples, hub_name, read_hub, read_tsv, tsv_path
from kdframe_glue.tasks import GlueTask

_FIELDS = ("input_ids", "token_type_ids", "labels")


def load_split(data: Any, task: GlueTask, split: str, tokenizer: Any, cache_dir: str) -> TokenizedSplit:
    """Load ``split`` of ``task`` as ``data`` (a recipe's DataSpec) describes, tokenised."""
    task.check_split(split)
    limit = data.train_limit if split == "train" else data.dev_limit
    read: Callable[[], Examples]
    glue_dir = data.params.glue_dir
    if glue_dir:
        path = tsv_path(glue_dir, task, split)
        stat = path.stat()
        source = str(path)
        origin = f"{path} size={stat.st_size} mtime_ns={stat.st_mtime_ns}"
        read = partial(read_tsv, path, task)
    else:
        # GLUE on the hub is frozen, so its name identifies the data (and a cached split needs no network).
        source = origin = hub_name(task, split)
        read = partial(read_hub, task, split)
    key = {"tokenizer": tokenizer_identity(tokenizer), "task": task.info.name, "split": split,
           "max_length": data.max_length, "limit": limit, "data": origin}
    file = _cache_root(cache_dir) / f"{task.info.name}-{split}-{_digest(key)[:24]}.json"
    columns = _read_cache(file, task.info, len(tokenizer))
    if columns is None:
        columns = tokenize(read().head(limit), tokenizer, data.max_length)
        _write_cache(file, columns)
    return TokenizedSplit(task.info, split, columns["input_ids"], columns["labels"],
                          {"token_type_ids": columns["token_type_ids"]}, source=source)


def data_fingerprint(data: Any, task: GlueTask) -> str:
    """What the task's train and dev data hold: a digest of the TSV files, or the frozen hub dataset's name."""
    glue_dir = data.params.glue_dir
    if not glue_dir:
        return " + ".join(hub_name(task, split) for split in ("train", "dev"))
    digest = hashlib.sha256()
    for split in ("train", "dev"):
        digest.update(tsv_path(glue_dir, task, split).read_bytes())
    return f"sha256:{digest.hexdigest()}"


def tokenize(examples: Examples, tokenizer: Any, max_length: int) -> dict[str, list]:
    """Unpadded ids; the engine pads per batch. Tokenizers without segment ids get zeros."""
    encoded = tokenizer(*examples.texts, truncation=True, max_length=max_length)
    input_ids = [list(ids) for ids in encoded["input_ids"]]
    token_type_ids = encoded.get("token_type_ids") or [[0] * len(ids) for ids in input_ids]
    return {"input_ids": input_ids, "token_type_ids": [list(t) for t in token_type_ids],
            "labels": list(examples.labels)}


def tokenizer_identity(tokenizer: Any) -> str:
    """What makes two tokenizers give the same ids: class, origin and the whole vocabulary."""
    vocab = tokenizer.get_vocab()
    return "|".join([type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")),
                     str(len(vocab)), _digest(sorted(vocab.items()))])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _cache_root(cache_dir: str) -> Path:
    return Path(cache_dir) / "glue"


def _read_cache(file: Path, task: TaskInfo, vocab_size: int) -> dict[str, list] | None:
    """The cached columns, or None when missing or unusable: a file that does not parse, or holds
    what the data cannot (a label outside the task's label set, a token id outside the
    vocabulary, lists that do not line up) is rebuilt, never used."""
    try:
        columns = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(columns, dict) or set(columns) != set(_FIELDS)
            or not all(isinstance(columns[f], list) for f in _FIELDS)
            or len({len(columns[f]) for f in _FIELDS}) != 1 or not columns["labels"]):
        return None
    labels, ids, types = columns["labels"], columns["input_ids"], columns["token_type_ids"]
    if task.is_regression:
        fits = all(isinstance(y, (int, float)) and not isinstance(y, bool) and math.isfinite(y) for y in labels)
    else:
        fits = all(type(y) is int and 0 <= y < task.num_labels for y in labels)
    fits = fits and all(isinstance(row, list) and isinstance(kinds, list) and len(row) == len(kinds) and
                        all(type(t) is int and 0 <= t < vocab_size for t in row) for row, kinds in zip(ids, types))
    return columns if fits else None


def _write_cache(file: Path, columns: dict[str, list]) -> None:
    """Write atomically: a crash or a parallel run never leaves half a file."""
    try:
        atomic_write(file, lambda f: f.write(json.dumps(columns, separators=(",", ":")).encode("utf-8")))
    except OSError as exc:  # a read-only cache costs speed, not correctness
        warnings.warn(f"kdframe_glue: cannot write the tokenisation cache {file}: {exc}", stacklevel=2)
