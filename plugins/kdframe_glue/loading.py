"""Tokenise a GLUE split into kdframe's Arrow token cache, so that repeated runs skip parsing and
tokenising (``kdframe.api.tokenize_to_arrow``)."""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any

from kdframe.api import TokenizedSplit, tokenize_to_arrow

from kdframe_glue.reading import hub_name, read_hub, read_tsv, tsv_path
from kdframe_glue.tasks import GlueTask


def load_split(data: Any, task: GlueTask, split: str, tokenizer: Any, cache_dir: str) -> TokenizedSplit:
    """Load ``split`` of ``task`` as ``data`` (a recipe's DataSpec) describes, tokenised."""
    task.check_split(split)
    limit = data.train_limit if split == "train" else data.dev_limit
    glue_dir = data.params.glue_dir
    if glue_dir:
        path = tsv_path(glue_dir, task, split)
        stat = path.stat()
        source = str(path)
        origin = f"{path} size={stat.st_size} mtime_ns={stat.st_mtime_ns}"
        read = partial(read_tsv, path, task, cache_dir, hashlib.sha256(origin.encode()).hexdigest()[:32])
    else:
        # GLUE on the hub is frozen, so its name identifies the data (and a cached split needs no network).
        source = origin = hub_name(task, split)
        read = partial(read_hub, task, split)

    def build() -> Any:
        raw = read()
        return raw.select(range(min(limit, len(raw)))) if limit > 0 else raw

    return tokenize_to_arrow(task.info, split, origin={"data": origin, "limit": limit}, build=build,
                             text_columns=task.info.text_columns, label_column="label", tokenizer=tokenizer,
                             max_length=data.max_length, cache_dir=cache_dir, where=source, source=source)


def data_fingerprint(data: Any, task: GlueTask) -> str:
    """What the task's train and dev data hold: a digest of the TSV files, or the frozen hub dataset's name."""
    glue_dir = data.params.glue_dir
    if not glue_dir:
        return " + ".join(hub_name(task, split) for split in ("train", "dev"))
    digest = hashlib.sha256()
    for split in ("train", "dev"):
        digest.update(tsv_path(glue_dir, task, split).read_bytes())
    return f"sha256:{digest.hexdigest()}"
