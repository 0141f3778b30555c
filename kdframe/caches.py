"""Where kdframe keeps what outlives a run: the cache root, and fine-tuned teachers in it.

The root is ``data.cache_dir``, else ``$KDFRAME_CACHE``, else ``~/.cache/kdframe``. Under it:
``teachers/<key>.pt`` (fine-tuned teachers, shared by every run and ablation cell with the same
key), ``teacher-features/<key>/`` (``kdframe.teacher_cache`` on disk) and what data plugins cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import attrs

from kdframe.errors import KdframeError

from kdframe.recipe import DataSpec, Recipe, to_plain


def cache_root(data: DataSpec) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir)
    return Path(os.environ.get("KDFRAME_CACHE", Path.home() / ".cache" / "kdframe")).expanduser()


def check_writable(root: Path, why: str) -> None:
    """A KdframeError saying ``why`` the cache must be writable, unless it is (it is made if missing)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise KdframeError(f"the cache directory {root} is not writable ({exc.strerror}); {why}: set"
                           " data.cache_dir or KDFRAME_CACHE to a writable directory") from None


def teacher_key(recipe: Recipe, fingerprint: str | None) -> str:
    """A fine-tuned teacher depends on its spec, its training stage, the data and the precision.

    ``fingerprint`` (the data plugin's digest of the data's content) stands for the data's files:
    with it, where they lie does not count (the source's path keys and the cache directory are
    left out), so a moved checkout keeps its teachers and an edited file gets a new one.
    """
    plain = to_plain(recipe)
    data = dict(plain["data"], cache_dir="")
    if fingerprint is not None and attrs.has(type(recipe.data.params)):
        located = [f.name for f in attrs.fields(type(recipe.data.params)) if f.metadata.get("path")]
        data.update(dict.fromkeys(located, ""), content=fingerprint)
    key = json.dumps({"teacher": plain["teacher"], "data": data, "precision": recipe.precision}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def teacher_path(recipe: Recipe, fingerprint: str | None) -> Path:
    """The cached fine-tuned teacher's file for this recipe (it may not exist yet)."""
    return cache_root(recipe.data) / "teachers" / f"{teacher_key(recipe, fingerprint)}.pt"
