"""Where kdframe keeps what outlives a run: the cache root, and fine-tuned teachers in it.

The root is ``data.cache_dir``, else ``$KDFRAME_CACHE``, else ``~/.cache/kdframe``. Under it:
``teachers/<key>.pt`` (fine-tuned teachers, shared by every run and ablation cell with the same
key), ``teacher-features/<key>/`` (``kdframe.teacher_cache`` on disk) and what data plugins cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
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


# -- what the cache holds (``kdframe cache``) ---------------------------------------------------------

@attrs.frozen
class CacheEntry:
    """One thing in the cache: a fine-tuned teacher, one feature set's directory, or a data plugin's
    top-level directory (kind ``other``). ``used`` is when a run last wrote or opened it."""

    kind: str
    path: Path
    bytes: int
    used: float
    about: str = ""
    links: int = 0  # run directories that hard-link a teacher: removing it frees nothing until they go


def mark_used(path: Path) -> None:
    """Record that a run opened ``path`` (its mtime), so ``kdframe cache`` can tell what is stale;
    a read-only cache loses nothing by not being marked."""
    try:
        os.utime(path)
    except OSError:
        pass


def stored_examples(directory: Path) -> dict[int, int]:
    """A teacher-feature directory's example files, ``<index>.pt``: index -> bytes. One removed
    meanwhile (``kdframe cache --remove`` beside a run) is left out, not an error."""
    stored = {}
    for file in directory.glob("*.pt"):
        if file.stem.isdigit():
            try:
                stored[int(file.stem)] = file.stat().st_size
            except FileNotFoundError:
                continue
    return stored


def _size(path: Path) -> int:
    """Bytes of the regular files at or under ``path``; one that a running run renames or removes
    meanwhile (a feature file's temp name) is skipped, not an error."""
    total = 0
    for file in (path, *path.rglob("*")) if path.is_dir() else (path,):
        try:
            info = file.lstat()
        except FileNotFoundError:
            continue
        total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def _features_about(directory: Path) -> tuple[str, float]:
    meta = directory / "key.json"
    try:
        parts = json.loads(meta.read_text())
        used = meta.stat().st_mtime
    except (OSError, ValueError):
        return "no key.json", directory.stat().st_mtime
    task = f"{parts['task']} {parts['split']}, " if "task" in parts else ""
    return f"{task}{len(stored_examples(directory))} examples, {', '.join(parts.get('needs', []))}, {parts.get('dtype', '?')}", used


def cache_inventory(root: Path) -> list[CacheEntry]:
    """Everything under the cache root, teachers and feature sets one by one, the rest per directory."""
    entries = []
    for top in sorted(root.iterdir()):
        if top.name == "teachers" and top.is_dir():
            for file in sorted(top.glob("*.pt")):
                info = file.stat()
                entries.append(CacheEntry("teachers", file, info.st_size, info.st_mtime, links=info.st_nlink - 1))
        elif top.name == "teacher-features" and top.is_dir():
            for directory in sorted(d for d in top.iterdir() if d.is_dir()):
                about, used = _features_about(directory)
                entries.append(CacheEntry("teacher-features", directory, _size(directory), used, about))
        else:
            entries.append(CacheEntry("other", top, _size(top), top.stat().st_mtime))
    return entries


def remove_entry(entry: CacheEntry) -> None:
    if entry.path.is_dir():
        shutil.rmtree(entry.path)
    else:
        entry.path.unlink()
