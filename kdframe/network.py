"""Whether a service is out of reach, asked once and in seconds: plugins that fetch from the
network (a model hub, a dataset server) use it to fail fast and in one line when offline, instead
of after their clients' retries."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit


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
