"""One distillation step: the only place where the hooks of a step are called, in their order.

``DistillStep.forward`` is the pure part: both models' features, the layer costs, a flow per cost
kind, the layer-weight update and the loss terms, returned with everything a caller logs. It
changes no state of its own: the layer weights come in and the next ones go out. ``train_step``
adds the update (finiteness checks, backward, optimizer). The trainer, ``kdframe validate``'s
dry run, the contract checks in ``kdframe.testing`` and the benchmarks all call these.

Each phase runs inside ``phase(name)``, by default ``torch.profiler.record_function``, so a
profiler shows where a step's time goes; the benchmarks pass a timer instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, ContextManager

import attrs
import torch

from kdframe.errors import PluginError
from kdframe.optim import Optimization
from kdframe.parallel import Processes
from kdframe.plugins import PluginHost
from kdframe.recipe import ResolvedStage
from kdframe.types import Features, LayerWeights, LoadedModel, StageContext, TaskInfo

Batch = dict[str, torch.Tensor]
Phase = Callable[[str], ContextManager[Any]]

#: The phases of a training step, in order (``forward`` runs the first six).
PHASES = ("teacher_forward", "student_forward", "costs", "transport", "weight_update", "loss_terms",
          "checks", "backward", "optimizer")


def marker(name: str) -> ContextManager[Any]:
    return torch.profiler.record_function(f"kdframe.{name}")


def stage_context(run_dir: Any, index: int, resolved: ResolvedStage, task: TaskInfo, student: LoadedModel,
                  teacher: LoadedModel | None, device: torch.device) -> StageContext:
    """The context the hooks of stage ``index`` (-1: the teacher's fine-tuning) see."""
    return StageContext(
        run_dir=run_dir, stage_index=index, stage=resolved.stage, task=task,
        student_layers=student.num_layers, teacher_layers=teacher.num_layers if teacher else 0,
        student_hidden_size=student.hidden_size, teacher_hidden_size=teacher.hidden_size if teacher else 0,
        student_heads=student.num_heads, teacher_heads=teacher.num_heads if teacher else 0,
        mapping=resolved.mapping, weighting=resolved.weighting, losses=resolved.losses, device=device,
        controls=resolved.controls, sparse_flow=resolved.sparse_flow,
    )


def uniform_weights(m: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((m,), 1.0 / m, device=device), torch.full((n,), 1.0 / n, device=device)


@attrs.frozen
class StepOutput:
    """What one forward of a step computed."""

    loss: torch.Tensor  # the weighted sum of the terms, with its graph
    terms: dict[str, torch.Tensor]  # the loss terms the plugins returned (the active ones at least)
    flows: dict[str, torch.Tensor]  # the flow of each cost kind
    weights: LayerWeights  # the layer weights the mappings used
    next_weights: LayerWeights  # the layer weights for the next step (after the weighting)


@attrs.frozen
class StepRecord:
    """What one training step did, summed over processes: the values logged and the state carried."""

    loss: float | None  # None: the step was skipped (non-finite)
    terms: dict[str, float]
    lr: float
    flows: dict[str, torch.Tensor]
    weights: LayerWeights
    next_weights: LayerWeights
    nonfinite: tuple[str, ...] = ()  # what was not finite, when the step was skipped

    def log(self) -> dict[str, Any]:
        """The record of metrics.jsonl and ``kdframe_step_end``."""
        if self.nonfinite:
            return {"loss": None, "skipped": True, "lr": self.lr}
        return {"loss": self.loss, "lr": self.lr, **self.terms}


class DistillStep:
    """The step of one stage: its hooks' context, its models and the features they must give.

    ``teacher`` is None for a stage without one (labels only); models may be None for callers that
    bring their own features (``from_features``).
    """

    def __init__(self, host: PluginHost, ctx: StageContext, student: LoadedModel | None = None,
                 teacher: LoadedModel | None = None, needs: frozenset[str] = frozenset(), phase: Phase = marker):
        self.host = host
        self.ctx = ctx
        self.student = student
        self.teacher = teacher
        self.needs = needs
        self.phase = phase
        self._plans: dict[tuple[str, int, int], torch.Tensor] = {}

    @property
    def where(self) -> str:
        return f"stages[{self.ctx.stage_index}]" if self.ctx.stage_index >= 0 else "teacher.train"

    def features(self, role: str, loaded: LoadedModel, batch: Batch) -> Features:
        return self.host.extract_features(role, loaded, batch, self.needs)

    def forward(self, batch: Batch, weights: LayerWeights,
                teacher_features: Callable[[Batch], Features] | None = None,
                share_costs: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> StepOutput:
        """Both models' features on ``batch``, then ``from_features``. ``teacher_features`` replaces
        the teacher's forward (the teacher cache); ``share_costs`` turns this process's costs into
        the global batch's for the mapping and the weighting (data parallel)."""
        with self.phase("teacher_forward"):
            teacher = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher = (teacher_features(batch) if teacher_features is not None
                               else self.features("teacher", self.teacher, batch))
        with self.phase("student_forward"):
            student = self.features("student", self.student, batch)
        return self.from_features(student, teacher, batch, weights, share_costs)

    def from_features(self, student: Features, teacher: Features | None, batch: Batch, weights: LayerWeights,
                      share_costs: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                      ) -> StepOutput:
        """Costs, flows, the weight update and the loss from the two models' features.

        A cost kind seen for the first time in a stage starts from uniform layer weights.
        """
        ctx, host = self.ctx, self.host
        with self.phase("costs"):
            costs = host.layer_costs(student, teacher, ctx, self.planned_pairs) if teacher is not None else {}
            shared = share_costs(costs) if share_costs is not None else costs
        flows, used, next_weights = self.map_layers(shared, weights)
        with self.phase("loss_terms"):
            terms = host.loss_terms(student, teacher, costs, flows, batch, ctx)
            missing = sorted(set(ctx.losses) - set(terms))
            if missing:
                raise PluginError(f"{self.where}: no plugin computed the loss term(s) {', '.join(missing)}")
            loss = sum(ctx.losses[name].weight * terms[name].float() for name in ctx.losses)
        return StepOutput(loss, terms, flows, used, next_weights)

    def planned_pairs(self, kind: str, m: int, n: int) -> torch.Tensor | None:
        """For a fixed mapping, the pairs its flow uses (a boolean M x N mask), else None. A fixed
        flow depends on neither costs nor weights, so it is asked once per kind with zero costs."""
        mapping = self.ctx.mapping
        if mapping is None or not self.host.registry.get("mapping", mapping.name).fixed:
            return None
        if (kind, m, n) not in self._plans:
            device = self.ctx.device
            zeros = torch.zeros(m, n, device=device)
            flow = self.host.layer_mapping(kind, zeros, uniform_weights(m, n, device), self.ctx)
            self._check_flow(kind, flow, zeros)
            self._plans[kind, m, n] = flow.detach() != 0
        return self._plans[kind, m, n]

    def map_layers(self, costs: dict[str, torch.Tensor], weights: LayerWeights,
                   ) -> tuple[dict[str, torch.Tensor], LayerWeights, LayerWeights]:
        """A flow per cost kind from the mapping, then the weighting's update: the flows, the
        weights they used and the weights for the next step."""
        ctx, host = self.ctx, self.host
        with self.phase("transport"):
            used, flows = {}, {}
            for kind, cost in costs.items():
                used[kind] = weights[kind] if kind in weights else uniform_weights(*cost.shape, cost.device)
                flows[kind] = host.layer_mapping(kind, cost, used[kind], ctx)
                self._check_flow(kind, flows[kind], cost)
        with self.phase("weight_update"):
            updated = host.update_layer_weights(flows, costs, used, ctx) if ctx.weighting is not None and costs else {}
        return flows, used, {**weights, **used, **updated}

    def _check_flow(self, kind: str, flow: Any, cost: torch.Tensor) -> None:
        """A mapping must return an M x N tensor for an M x N cost; else name the strategy and its plugin."""
        if isinstance(flow, torch.Tensor) and flow.shape == cost.shape:
            return
        name = self.ctx.mapping.name if self.ctx.mapping else "(none)"
        plugin = self.host.registry.get("mapping", name).plugin if self.ctx.mapping else "?"
        got = f"a flow of shape {tuple(flow.shape)}" if isinstance(flow, torch.Tensor) else f"a {type(flow).__name__}"
        raise PluginError(f"{self.where}: mapping {name!r} (plugin {plugin!r}) returned {got} for cost {kind!r};"
                          f" expected shape {tuple(cost.shape)} (student x teacher layers)")


def train_step(step: DistillStep, optimization: Optimization, processes: Processes, batch: Batch,
               weights: LayerWeights, *, share: float = 1.0,
               teacher_features: Callable[[Batch], Features] | None = None,
               autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> StepRecord:
    """One optimizer step on this process's ``share`` of the global batch (1.0 in one process).

    The loss and terms are summed over processes before they are checked, so every process takes
    the same branch: a non-finite value (or non-finite layer weights) skips the update and keeps
    the layer weights the step started from; the caller decides whether to stop.
    """
    step.student.model.train()
    with autocast():
        out = step.forward(batch, weights, teacher_features, lambda costs: processes.shared_costs(costs, share))
    with step.phase("checks"):
        names = list(step.ctx.losses)
        scalars = [t.detach().float().reshape(()) for t in (out.loss, *(out.terms[n] for n in names))]
        values = processes.reduce_sum(torch.stack(scalars) * share).tolist()
        bad = [f"loss term {name!r} = {value}" for name, value in zip(names, values[1:]) if not math.isfinite(value)]
        # the layer weights come from the shared costs: the same on every process
        bad += [f"layer weights of {kind!r}" for kind, (ws, wt) in out.next_weights.items()
                if not (torch.isfinite(ws).all() and torch.isfinite(wt).all())]
    if bad:
        optimization.discard()
        return StepRecord(None, {}, optimization.lr, out.flows, out.weights, {**weights, **out.weights}, tuple(bad))
    with step.phase("backward"):
        optimization.backward(out.loss * share)
        processes.sum_gradients(optimization.modules)
    with step.phase("optimizer"):
        optimization.step()
    return StepRecord(values[0], dict(zip(names, values[1:])), optimization.lr, out.flows, out.weights,
                      out.next_weights)
