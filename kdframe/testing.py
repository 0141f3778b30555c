"""Test helpers for kdframe and its plugin authors (a pytest plugin, entry point ``pytest11``).

Fixtures: ``kdframe_host`` (the installed plugins, freshly loaded) and ``make_host`` (a factory
that adds inline plugin objects, e.g. a class with ``@hookimpl`` methods, to the installed ones).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from kdframe.plugins import PluginHost, load_plugins


@pytest.fixture
def kdframe_host() -> PluginHost:
    return load_plugins()


@pytest.fixture
def make_host() -> Callable[..., PluginHost]:
    def make(*plugins: Any, blocked: tuple[str, ...] = ()) -> PluginHost:
        return load_plugins([f"no:{name}" for name in blocked], objects=plugins)

    return make
