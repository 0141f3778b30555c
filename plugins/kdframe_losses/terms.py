"""The prediction-layer losses themselves (docs/method.md section 5), imported at the first step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdframe_losses import PredParams


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
