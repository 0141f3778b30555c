"""kdframe's pytest plugin (entry point ``pytest11``): fixtures for testing plugins.

``kdframe_host``: the installed plugins, freshly loaded. ``make_host``: a factory adding inline
plugin objects (e.g. a class with ``@hookimpl`` methods) to them, optionally blocking some by
name. pytest loads this module in every session of an environment where kdframe is installed, so
it imports nothing heavy: the contract checks and builders are in ``kdframe.testing``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
