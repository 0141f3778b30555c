"""Prediction-layer loss terms (docs/method.md section 5): ``pred`` (soft targets from the teacher)
and ``hard`` (gold labels, no teacher needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from kdframe.api import Features, NoParams, Registry, StageContext, bounded, hookimpl

if TYPE_CHECKING:
    import torch


@attrs.frozen
class PredParams:
    """``t2 = false`` drops the T^2 factor (TinyBERT's prediction stage). On a regression task the
    student's score is fitted to the teacher's (``regression_target = "teacher"``, BERT-EMD) or to
    the gold score (``"gold"``: TinyBERT's task_distill, whose prediction stage on STS-B trains
    against the labels)."""

    temperature: float = bounded(1.0, gt=0)  # T of both softmaxes (classification)
    t2: bool = True  # multiply by T^2 (false: TinyBERT's prediction stage)
    regression_target: Literal["teacher", "gold"] = "teacher"  # regression: MSE to the teacher's score or the gold one


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add("loss", "pred", params=PredParams, needs=("logits",),
                 description="soft cross-entropy to the teacher's logits (MSE for regression)")
    registry.add("loss", "hard", params=NoParams, student_only=True,
                 description="cross-entropy with the gold labels (MSE for regression)")


@hookimpl
def kdframe_loss_terms(
    student: Features,
    teacher: Features | None,
    costs: dict[str, torch.Tensor],
    flows: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    ctx: StageContext,
) -> dict[str, torch.Tensor]:
    from kdframe_losses.terms import hard_loss, pred_loss  # torch: only once a stage trains

    regression = ctx.task.is_regression
    terms = {}
    if ctx.active("pred"):
        params = ctx.losses["pred"].params
        if regression and params.regression_target == "gold":
            terms["pred"] = hard_loss(student.logits, batch["labels"], regression)
        else:
            terms["pred"] = pred_loss(student.logits, teacher.logits, params, regression)
    if ctx.active("hard"):
        terms["hard"] = hard_loss(student.logits, batch["labels"], regression)
    return terms
