"""The public API for plugin authors: everything a plugin may import from kdframe.

Anything not re-exported here is private and may change without notice.
"""

from kdframe.errors import DataError, KdframeError, ModelError, PluginError, RecipeError, RunFailed
from kdframe.fileio import atomic_write
from kdframe.flows import check_layer_list, fixed_flow, outer_flow, solve_transport
from kdframe.network import unreachable
from kdframe.plugins import hookimpl
from kdframe.recipe import bounded, path_field
from kdframe.registry import DataSource, ModelSource, NoParams, Registry, Strategy, Task
from kdframe.types import (
    FEATURES,
    Features,
    LayerWeights,
    LoadedModel,
    Selected,
    StageContext,
    TaskInfo,
    TokenizedSplit,
)

__all__ = [
    "FEATURES",
    "DataError",
    "DataSource",
    "Features",
    "KdframeError",
    "LayerWeights",
    "LoadedModel",
    "ModelError",
    "ModelSource",
    "NoParams",
    "PluginError",
    "RecipeError",
    "Registry",
    "RunFailed",
    "Selected",
    "StageContext",
    "Strategy",
    "Task",
    "TaskInfo",
    "TokenizedSplit",
    "atomic_write",
    "bounded",
    "check_layer_list",
    "fixed_flow",
    "hookimpl",
    "outer_flow",
    "path_field",
    "solve_transport",
    "unreachable",
]
