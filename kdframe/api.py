"""The public API for plugin authors: everything a plugin may import from kdframe.

Anything not re-exported here is private and may change without notice.
"""

from kdframe.errors import DataError, KdframeError, KdframeWarning, ModelError, PluginError, RecipeError, RunFailed
from kdframe.fileio import atomic_write
from kdframe.memory import PREFIX as MEMORY_PREFIX
from kdframe.memory import get as memory_object
from kdframe.flows import check_layer_list, fixed_flow, outer_flow, solve_transport
from kdframe.network import load_hub_dataset, unreachable
from kdframe.plugins import hookimpl
from kdframe.recipe import MAX_SEED, bounded, path_field
from kdframe.registry import DataSource, ModelSource, NoParams, Registry, Strategy, Task
from kdframe.tokens import check_columns, first_true, quiet_progress, tokenize_to_arrow, tokenizer_identity
from kdframe.types import (
    EXTRACTABLE,
    FEATURES,
    Control,
    Features,
    LayerWeights,
    LoadedModel,
    Selected,
    StageContext,
    TaskInfo,
    TokenizedSplit,
)

__all__ = [
    "EXTRACTABLE",
    "FEATURES",
    "MAX_SEED",
    "MEMORY_PREFIX",
    "Control",
    "DataError",
    "DataSource",
    "Features",
    "KdframeError",
    "KdframeWarning",
    "LayerWeights",
    "LoadedModel",
    "ModelError",
    "memory_object",
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
    "check_columns",
    "bounded",
    "check_layer_list",
    "first_true",
    "fixed_flow",
    "hookimpl",
    "load_hub_dataset",
    "outer_flow",
    "path_field",
    "quiet_progress",
    "solve_transport",
    "tokenize_to_arrow",
    "tokenizer_identity",
    "unreachable",
]
