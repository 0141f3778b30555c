"""Files written so that a crash never leaves half of one, and the JSONL logs read back.

Every file kdframe rewrites (checkpoints, run and ablation state, caches, the progress status) goes
through ``atomic_write``: a temporary file in the same directory, then a rename, so a reader (or
the next run after a kill) sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from kdframe.errors import KdframeError


class _Writes:
    """A file handle that keeps the OSError of a failed write: torch.save reports a full disk as
    a RuntimeError about zip positions, and the real cause must reach the user."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, durable: bool = False,
                 before_replace: Callable[[Path], None] | None = None) -> None:
    """Write ``path`` through ``write(handle)`` (a binary file handle), atomically.

    ``durable``: fsync before the rename, so the new file survives a power loss too (checkpoints;
    a lost cache or log line is rebuilt or rewritten anyway). ``before_replace(tmp)`` runs once
    the new file is written, before it takes the old one's place (to check it, or keep the old one). Parent directories are created. A failed write
    raises its OSError (no space, file too large, permission), whatever ``write`` made of it; the
    old file is then untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            handle = _Writes(raw)
            try:
                write(handle)
                if durable:
                    raw.flush()
                    os.fsync(raw.fileno())
            except Exception:
                if handle.error is not None:
                    raise handle.error from None
                raise
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_link(source: Path, path: Path) -> bool:
    """Make ``path`` a hard link to ``source`` (the same bytes, no second copy on disk), replacing
    ``path`` atomically; False, with nothing changed, where the filesystem cannot link them (another
    device, no hard links)."""
    tmp = path.with_name(f".{path.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        return False
    os.replace(tmp, path)
    return True


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


@contextmanager
def exclusive_use(lock: Path) -> Iterator[None]:
    """Hold ``lock`` (a file in the directory this process writes) for the duration: a second kdframe
    process on the same run or ablation directory (two ``--resume`` of one run, say) would
    interleave its checkpoints and state files with this one's, so it is refused (exit 2), naming
    the holder. An flock, which the kernel releases when its holder exits or is killed, so that no
    stale lock outlives a crash. The holder removes the file while still holding it; a newcomer
    that locked the removed file sees it is no longer at ``lock`` and takes the new one.
    """
    while True:
        handle = open(lock, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "its pid is not recorded yet"
            handle.close()
            raise KdframeError(f"{lock.parent} is in use by another kdframe process ({holder}): two processes would"
                               " overwrite each other's checkpoints and state there; wait for it to end, or stop it"
                               " (on SIGTERM or Ctrl-C it checkpoints) and resume") from None
        try:
            held = os.stat(lock)
        except FileNotFoundError:
            held = None
        opened = os.fstat(handle.fileno())
        if held is not None and (held.st_dev, held.st_ino) == (opened.st_dev, opened.st_ino):
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}:"
                     f" {shlex.join(sys.argv)}\n")
        handle.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


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
