"""The hook points of kdframe. Each function here documents one hook; plugins implement them
with ``@kdframe.hookimpl`` and the same name. ``firstresult`` hooks stop at the first plugin that
returns something other than None; the others collect every plugin's answer.

Order inside one training step of a distillation stage:
extract_features(teacher) -> extract_features(student) -> layer_costs -> layer_mapping (per cost
kind) -> update_layer_weights -> loss_terms -> backward/optimizer -> step_end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse

    import torch

    from kdframe.registry import StrategyRegistry
    from kdframe.types import Features, LoadedModel, StageContext, TaskInfo, TokenizedSplit

hookspec = pluggy.HookspecMarker("kdframe")


@hookspec
def kdframe_register_strategies(registry: StrategyRegistry) -> None:
    """Register named strategies for the ``mapping``, ``weighting`` and ``loss`` slots.

    Called once after all plugins are loaded, before any recipe is resolved. Call
    ``registry.add(slot, name, params=ParamsClass, needs=(...))``; a name already taken in a
    slot is an error naming both plugins.

    Example::

        @hookimpl
        def kdframe_register_strategies(registry):
            registry.add("mapping", "sinkhorn", params=SinkhornParams)
    """


@hookspec
def kdframe_add_cli_options(parser: argparse.ArgumentParser) -> None:
    """Add options to the ``kdframe run`` and ``kdframe validate`` parsers.

    Called while the command line is built. Use a prefix for option names (``--sinkhorn-x``);
    the parsed values reach ``kdframe_run_start`` as ``run.options`` (a dict).
    """


@hookspec
def kdframe_validate_recipe(recipe: Any, registry: StrategyRegistry) -> list[str]:
    """Return problems with a resolved recipe, each a string starting with its field path.

    Called by ``kdframe validate`` and before ``kdframe run`` trains anything; every plugin's
    problems are reported together. Return an empty list when all is well.

    Example: ``["stages[0].mapping: one-to-one needs N % M == 0 (N=6, M=4); give layers"]``.
    """


@hookspec(firstresult=True)
def kdframe_task_info(name: str) -> TaskInfo | None:
    """Describe the task ``name`` (labels, metrics) or return None when it is not yours."""


@hookspec
def kdframe_task_names() -> list[str]:
    """Return the task names this plugin serves (for error messages listing known tasks)."""


@hookspec(firstresult=True)
def kdframe_load_data(
    data: Any, task: TaskInfo, split: str, tokenizer: Any, cache_dir: str | None
) -> TokenizedSplit | None:
    """Load and tokenise one split (``train`` or ``dev``) of the recipe's ``[data]`` section.

    Errors in the data are raised as ``kdframe.DataError`` naming the file and line.
    """


@hookspec(firstresult=True)
def kdframe_data_fingerprint(data: Any) -> str | None:
    """Identify the content of the recipe's ``[data]`` (a digest of its files, say), or return None
    when the data is not yours.

    Fine-tuned teachers are cached under a key made of this instead of the data's location: a
    moved checkout keeps its teachers, and an edited data file gets a new teacher instead of a
    stale one. Without an answer the key uses the ``[data]`` section as written, paths included.
    """


@hookspec(firstresult=True)
def kdframe_compute_metrics(task: TaskInfo, predictions: Any, labels: Any) -> dict[str, float]:
    """Compute the task's metrics from predictions (class ids, or scores for regression)."""


@hookspec(firstresult=True)
def kdframe_load_model(
    role: str, spec: Any, task: TaskInfo, teacher: LoadedModel | None, base_dir: str
) -> LoadedModel | None:
    """Load or build the ``teacher`` or ``student`` model described by ``spec``.

    For the student, ``teacher`` is the loaded teacher (a student may be built from its layers).
    ``base_dir`` is the recipe's directory, against which relative paths resolve.
    """


@hookspec(firstresult=True)
def kdframe_export_model(loaded: LoadedModel, out_dir: str) -> str | None:
    """Write ``loaded`` (model and tokenizer) to ``out_dir`` in its framework's own format, so
    that it loads without kdframe; return a one-line description of what was written."""


@hookspec(firstresult=True)
def kdframe_extract_features(
    role: str, model: torch.nn.Module, batch: dict[str, torch.Tensor], needs: frozenset[str]
) -> Features | None:
    """Run ``model`` on ``batch`` and return the features named in ``needs``.

    ``needs`` is a subset of ``kdframe.types.FEATURES``; logits are always returned. The teacher
    is called under ``torch.no_grad()`` and in eval mode by the engine.
    """


@hookspec
def kdframe_layer_costs(
    student: Features, teacher: Features, ctx: StageContext
) -> dict[str, torch.Tensor]:
    """Return cost matrices (M x N, student layers 1..M against teacher layers 1..N), keyed by
    feature kind (``att``, ``hid``, ...). The matrices keep their autograd graph.

    Every plugin's dict is merged; two plugins returning the same kind is an error.
    """


@hookspec(firstresult=True)
def kdframe_layer_mapping(
    kind: str, cost: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], ctx: StageContext
) -> torch.Tensor | None:
    """Turn a cost matrix (M x N) and layer weights (student M, teacher N) into a flow (M x N).

    Implement it for the strategy ``ctx.mapping.name`` only; return None for any other. The flow
    is a constant for backprop (detached), non-negative, on the cost's device and dtype.
    """


@hookspec(firstresult=True)
def kdframe_update_layer_weights(
    flows: dict[str, torch.Tensor],
    costs: dict[str, torch.Tensor],
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ctx: StageContext,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Return the layer weights (student, teacher) per cost kind for the next step.

    Implement it for the strategy ``ctx.weighting.name`` only. Weights must stay on the
    simplex, finite and strictly positive. The engine checkpoints them.
    """


@hookspec
def kdframe_loss_terms(
    student: Features,
    teacher: Features | None,
    costs: dict[str, torch.Tensor],
    flows: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    ctx: StageContext,
) -> dict[str, torch.Tensor]:
    """Return scalar loss terms by name, only for terms active in ``ctx.losses``.

    The engine multiplies each by its recipe weight and sums them.
    """


@hookspec
def kdframe_extra_parameters(ctx: StageContext) -> dict[str, torch.nn.Module]:
    """Return trainable modules owned by strategies for this stage (e.g. the projection W_h).

    They are trained with the student, saved in checkpoints and never exported.
    """


@hookspec
def kdframe_run_start(run: Any) -> None:
    """Called once a run directory exists and models and data are loaded."""


@hookspec
def kdframe_stage_start(ctx: StageContext) -> None:
    """Called before the first step of a stage (also when resuming it)."""


@hookspec
def kdframe_step_end(ctx: StageContext, record: dict[str, Any]) -> None:
    """Called after every optimizer step with the train record written to metrics.jsonl."""


@hookspec
def kdframe_eval_end(ctx: StageContext, metrics: dict[str, float]) -> None:
    """Called after each dev evaluation with its metrics."""


@hookspec
def kdframe_stage_end(ctx: StageContext) -> None:
    """Called after the last step of a stage."""


@hookspec
def kdframe_run_end(run: Any, summary: dict[str, Any]) -> None:
    """Called when a run finished, with the summary written to summary.json."""


@hookspec
def kdframe_on_exception(run: Any, exc: BaseException) -> None:
    """Called when a run stops with an exception (including Ctrl-C) before the CLI exits."""


@hookspec
def kdframe_state_dict(ctx: StageContext) -> dict[str, Any]:
    """Return ``{plugin_key: state}`` to store in a checkpoint (tensors and plain data only:
    checkpoints load with ``weights_only=True``)."""


@hookspec
def kdframe_load_state_dict(ctx: StageContext, state: dict[str, Any]) -> None:
    """Restore what ``kdframe_state_dict`` returned; take your own key from ``state``."""
