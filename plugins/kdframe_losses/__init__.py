"""Prediction-layer loss terms (docs/method.md section 5): ``pred`` (soft targets from the teacher)
and ``hard`` (gold labels, no teacher needed)."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from kdframe.api import Features, NoParams, StageContext, Registry, bounded, hookimpl


@attrs.frozen
class PredParams:
    """``t2 = false`` drops the T^2 factor (TinyBERT's prediction stage)."""

    temperature: float = bounded(1.0, gt=0)
    t2: bool = True


def pred_loss(student: torch.Tensor, teacher: torch.Tensor, params: PredParams, regression: bool) -> torch.Tensor:
    """T^2 * mean over batch AND classes of -softmax(z^T/T) * log_softmax(z^S/T).

    The mean over classes is the reference code's ``.mean()`` reduction (batch-mean cross-entropy
    divided by C); keeping it keeps beta's meaning. Regression: MSE(z^S, z^T), no temperature.
    """
    student, teacher = student.float(), teacher.float()
    if regression:
        return F.mse_loss(student.view(-1), teacher.view(-1))
    temp = params.temperature
    loss = (-torch.softmax(teacher / temp, -1) * torch.log_softmax(student / temp, -1)).mean()
    return loss * temp**2 if params.t2 else loss


def hard_loss(student: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Cross-entropy with the gold labels; MSE to the gold score for regression."""
    if regression:
        return F.mse_loss(student.float().view(-1), labels.float().view(-1))
    return F.cross_entropy(student.float(), labels.long())


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
    regression = ctx.task.is_regression
    terms = {}
    if ctx.active("pred"):
        terms["pred"] = pred_loss(student.logits, teacher.logits, ctx.losses["pred"].params, regression)
    if ctx.active("hard"):
        terms["hard"] = hard_loss(student.logits, batch["labels"], regression)
    return terms
