"""Whether a service is out of reach, asked once and in seconds: plugins that fetch from the
network (a model hub, a dataset server) use it to fail fast and in one line when offline, instead
of after their clients' retries."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kdframe.errors import DataError

if TYPE_CHECKING:
    import datasets


def unreachable(url: str, *offline_flags: str, timeout: float = 3.0) -> str | None:
    """Why ``url``'s host cannot be reached (an environment flag in ``offline_flags`` set to a
    true value, no name resolution, no connection within ``timeout`` seconds), or None. The
    network is asked once per host and process."""
    for flag in offline_flags:
        if os.environ.get(flag, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{flag} is set"
    parts = urlsplit(url)
    return _probe(parts.hostname or url, parts.port or (80 if parts.scheme == "http" else 443), timeout)


@functools.cache
def _probe(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host} is out of reach ({exc.strerror or type(exc).__name__})"


def hub_endpoint_unreachable() -> str | None:
    """Why the Hugging Face hub is out of reach (its endpoint, or an offline flag), or None."""
    return unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def load_hub_dataset(path: str, *args: Any, what: str = "", remedy: str, **kwargs: Any) -> datasets.Dataset:
    """``datasets.load_dataset(path, *args, **kwargs)``; offline, from the local datasets cache
    only (an error in a second, not after retries). A failure is one DataError naming ``what``
    (default: ``path``) and ending in ``remedy``."""
    import datasets

    offline = hub_endpoint_unreachable()
    try:
        with _offline_mode(offline is not None):
            return datasets.load_dataset(path, *args, **kwargs)
    except Exception as exc:  # offline, no cached copy, hub or auth errors: the remedy is the same
        reason = (f"the Hugging Face hub cannot be reached ({offline}) and it is not in the local datasets cache"
                  if offline is not None else f"{type(exc).__name__}: {exc}")
        raise DataError(f"cannot load {what or path}: {reason}. {remedy}") from None


@contextlib.contextmanager
def _offline_mode(offline: bool) -> Iterator[None]:
    """datasets and huggingface_hub read their offline switch once, at import: set it for one call."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = offline or saved[0]
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
