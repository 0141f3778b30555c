"""The public API for plugin authors: everything a plugin may import from kdframe.

Anything not re-exported here is private and may change without notice.
"""

from kdframe.errors import DataError, KdframeError, ModelError, PluginError, RecipeError, RunFailed
from kdframe.plugins import hookimpl
from kdframe.recipe import bounded
from kdframe.registry import NoParams, Strategy, StrategyRegistry
from kdframe.types import FEATURES, Features, LoadedModel, Selected, StageContext, TaskInfo, TokenizedSplit

__all__ = [
    "FEATURES",
    "DataError",
    "Features",
    "KdframeError",
    "LoadedModel",
    "ModelError",
    "NoParams",
    "PluginError",
    "RecipeError",
    "RunFailed",
    "Selected",
    "StageContext",
    "Strategy",
    "StrategyRegistry",
    "TaskInfo",
    "TokenizedSplit",
    "bounded",
    "hookimpl",
]
