"""Where a model or tokenizer comes from: a local directory, a hub id or ``package:NAME``."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

from kdframe.api import ModelError


def resolve_source(value: str, base_dir: str) -> str:
    """Return a local directory or a hub id for ``value``; local paths must exist.

    The recipe has already made existing relative paths absolute; anything that still looks
    like a path (absolute, ``.``, ``~``) or exists under ``base_dir`` is local, the rest is a hub id.
    """
    if value.startswith("package:"):
        return str(package_model_path(value.removeprefix("package:")))
    if value.startswith((".", "~")) or Path(value).is_absolute() or (Path(base_dir) / value).exists():
        path = (Path(base_dir) / Path(value).expanduser()).resolve()
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise ModelError(f"model directory {path} {what}")
        return str(path)
    return value


def package_model_path(name: str) -> Path:
    """The directory an installed model package ships (its ``get_model_path()``).

    Only the top-level package of an installed distribution is imported: a recipe must not make
    kdframe import (run) any other module, e.g. one in the working directory or on PYTHONPATH.
    """
    if not name.isidentifier() or name not in importlib.metadata.packages_distributions():
        raise ModelError(f"package:{name}: cannot import the model package {name!r}: no installed distribution"
                         " provides a top-level package of that name; is it installed?")
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


def is_local(source: str) -> bool:
    """Whether a resolved source is a directory (else it is a hub id)."""
    return Path(source).is_absolute()
