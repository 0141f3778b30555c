"""Early stopping: end a stage once its main dev metric stops improving.

``controls = { early-stopping = { patience = 3, min_delta = 0.001 } }`` in a stage: after each
dev evaluation, the stage's main metric (higher is better) counts as improved when it beats the
best so far by more than ``min_delta``; ``patience`` evaluations in a row without improvement
stop the stage (``kdframe.api.Control``), which then ends as usual: the best model is selected
(``select = "best"``) and the next stage starts. The count survives a resume.
"""

from __future__ import annotations

from typing import Any

import attrs

from kdframe.api import Control, Registry, StageContext, bounded, hookimpl

NAME = "early-stopping"


@attrs.frozen
class EarlyStoppingParams:
    patience: int = bounded(3, ge=1)  # evaluations in a row without improvement that stop the stage
    min_delta: float = bounded(0.0, ge=0)  # an improvement is a main-metric gain of more than this


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add("control", NAME, EarlyStoppingParams,
                 description="stop the stage when the main dev metric has not improved for patience evaluations")


def _state(ctx: StageContext) -> dict[str, Any]:
    return ctx.state.setdefault(NAME, {"best": None, "stale": 0})


@hookimpl
def kdframe_eval_end(ctx: StageContext, metrics: dict[str, float]) -> Control | None:
    chosen = ctx.controls.get(NAME)
    if chosen is None:
        return None
    state = _state(ctx)
    value = metrics[ctx.task.main_metric]
    if state["best"] is None or value > state["best"] + chosen.params.min_delta:
        state["best"], state["stale"] = value, 0
        return None
    state["stale"] += 1
    if state["stale"] < chosen.params.patience:
        return None
    return Control(stop=True, reason=f"early stopping: dev {ctx.task.main_metric} has not improved on"
                                     f" {state['best']:.4f} by more than {chosen.params.min_delta:g} for"
                                     f" {state['stale']} evaluations")


@hookimpl
def kdframe_state_dict(ctx: StageContext) -> dict[str, Any]:
    return {"early_stopping": dict(_state(ctx))} if NAME in ctx.controls else {}


@hookimpl
def kdframe_load_state_dict(ctx: StageContext, state: dict[str, Any]) -> None:
    if NAME in ctx.controls and "early_stopping" in state:
        ctx.state[NAME] = dict(state["early_stopping"])
