"""The dry run behind ``kdframe validate`` and the start of ``kdframe run``: the first step of
every stage on a few dev examples, without training.

It catches what only shows once models are loaded (layer counts a mapping cannot handle, head
counts that cannot be compared, a plugin returning a wrong shape or no loss term) before any
training, and gives ``kdframe validate`` the initial flows to print.
"""

from __future__ import annotations

import attrs
import torch

from kdframe.batches import collate
from kdframe.session import Session
from kdframe.step import DistillStep, stage_context


@attrs.frozen
class StagePlan:
    stage: str
    needs: list[str]  # features read from both models (logits always come)
    student_layers: int
    teacher_layers: int  # 0 for a stage without a teacher
    losses: dict[str, float]  # active terms and their weights
    mapping: str | None
    weighting: str | None
    flows: dict[str, list[list[float]]]  # per cost kind, on the first dev examples, from uniform weights


def plan(session: Session, examples: int = 4) -> list[StagePlan]:
    """Run each stage's first step forward (extra parameters and stage start first, as training
    does) on the first ``examples`` dev examples; the global RNG is left as it was."""
    s = session
    device = torch.device("cpu")
    rng = torch.get_rng_state()
    batch = collate(s.dev, list(range(min(examples, len(s.dev)))), device)
    plans = []
    for index, resolved in enumerate(s.stages):
        teacher = s.teacher if resolved.needs_teacher(s.host.registry) else None
        needs = resolved.needs(s.host.registry) if teacher else frozenset()
        ctx = stage_context(None, index, resolved, s.task, s.student, teacher, device)
        s.host.extra_parameters(ctx)
        s.host.stage_start(ctx)
        with torch.no_grad():
            out = DistillStep(s.host, ctx, s.student, teacher, needs).forward(batch, {})
        plans.append(StagePlan(
            resolved.stage.name, sorted(needs), ctx.student_layers, ctx.teacher_layers,
            {name: choice.weight for name, choice in resolved.losses.items()},
            resolved.mapping.name if resolved.mapping else None,
            resolved.weighting.name if resolved.weighting else None,
            {kind: flow.float().tolist() for kind, flow in out.flows.items()}))
    torch.set_rng_state(rng)
    return plans
