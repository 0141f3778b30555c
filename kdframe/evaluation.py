"""Dev evaluation: a model's predictions on the dev split, scored by the task's metrics plugin."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ContextManager

import torch

from kdframe.batches import collate
from kdframe.parallel import Processes
from kdframe.plugins import PluginHost
from kdframe.types import LoadedModel, TokenizedSplit


@torch.no_grad()
def evaluate(host: PluginHost, dev: TokenizedSplit, loaded: LoadedModel, batch_size: int, device: torch.device,
             processes: Processes, autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
             ) -> dict[str, float]:
    """The task's metrics of ``loaded`` on ``dev``, in eval mode (the model's mode is restored).

    With several processes, process r predicts batches r, r + world, ...; every process gathers
    all of them, in order, and computes the same metrics.
    """
    task = dev.task
    was_training = loaded.model.training
    loaded.model.eval()
    predictions = []
    for start in range(0, len(dev), batch_size)[processes.rank::processes.world]:
        batch = collate(dev, list(range(start, min(start + batch_size, len(dev)))), device)
        with autocast():
            logits = host.extract_features("student", loaded, batch, frozenset()).logits.float()
        predictions.append((start, (logits if task.is_regression else logits.argmax(-1)).cpu()))
    loaded.model.train(was_training)
    predictions = processes.gather_in_order(predictions)
    preds = torch.cat([p for _, p in predictions]).numpy()
    return host.compute_metrics(task, preds, dev.labels())
