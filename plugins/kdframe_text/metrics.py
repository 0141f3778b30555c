"""Classification and regression metrics on predicted class ids (or scores), with numpy and scipy only."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from scipy import stats


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(pred == gold))


def f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """Binary F1 of the positive class 1; 0.0 when there is neither a predicted nor a gold positive."""
    tp = np.sum((pred == 1) & (gold == 1))
    fp = np.sum((pred == 1) & (gold != 1))
    fn = np.sum((pred != 1) & (gold == 1))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """The mean over classes of each class's F1 (one class against the rest); the classes are those
    in gold or predicted (sklearn's ``f1_score(average="macro")``)."""
    scores = []
    for label in np.unique(np.concatenate([gold, pred])):
        tp = np.sum((pred == label) & (gold == label))
        denominator = 2 * tp + np.sum((pred == label) & (gold != label)) + np.sum((pred != label) & (gold == label))
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation (sklearn's multiclass form, used by GLUE); 0.0 when a side is constant."""
    classes, index = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    n = len(gold)
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (index[:n], index[n:]), 1)
    true_sum, pred_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    covariance = np.trace(confusion) * n - true_sum @ pred_sum
    denominator = np.sqrt((n * n - pred_sum @ pred_sum) * (n * n - true_sum @ true_sum))
    return float(covariance / denominator) if denominator else 0.0


def _correlation(statistic: Callable[..., Any]) -> Callable[[np.ndarray, np.ndarray], float]:
    def metric(pred: np.ndarray, gold: np.ndarray) -> float:
        # Undefined for constant input (scipy warns and gives nan); like matthews, no variation scores 0.
        if np.ptp(pred) == 0 or np.ptp(gold) == 0:
            return 0.0
        return float(statistic(pred, gold).statistic)
    return metric


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "matthews": matthews,
    "pearson": _correlation(stats.pearsonr),
    "spearman": _correlation(stats.spearmanr),
}
#: Metrics that compare scores, not class ids.
REGRESSION = frozenset({"pearson", "spearman"})


def compute(names: Iterable[str], predictions: Any, labels: Any) -> dict[str, float]:
    pred = np.asarray(predictions, dtype=np.float64).reshape(-1)
    gold = np.asarray(labels, dtype=np.float64).reshape(-1)
    if pred.shape != gold.shape or not len(gold):
        raise ValueError(f"metrics need as many predictions as labels (at least one), "
                         f"got {len(pred)} and {len(gold)}")
    return {name: METRICS[name](pred, gold) for name in names}
