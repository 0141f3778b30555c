"""Files written so that a crash never leaves half of one, and the JSONL logs read back.

Every file kdframe rewrites (checkpoints, run and ablation state, caches, the progress status) goes
through ``atomic_write``: a temporary file in the same directory, then a rename, so a reader (or
the next run after a kill) sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, durable: bool = False) -> None:
    """Write ``path`` through ``write(handle)`` (a binary file handle), atomically.

    ``durable``: fsync before the rename, so the new file survives a power loss too (checkpoints;
    a lost cache or log line is rebuilt or rewritten anyway). Parent directories are created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def read_json(path: Path) -> Any:
    """The JSON value in ``path``, or None when it is missing or unreadable (torn by a kill)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file; a line torn by a kill is skipped, a missing file is empty."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue
