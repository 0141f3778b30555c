"""Batches from a tokenised split: the order of an epoch, and padding examples into tensors."""

from __future__ import annotations

import torch

from kdframe.types import TokenizedSplit


def epoch_order(size: int, seed: int, stage_index: int, epoch: int) -> list[int]:
    """The examples of one epoch, shuffled by a generator of their own: the order depends on
    (seed, stage, epoch) only, never on what else drew random numbers, so a resumed run replays it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + (stage_index + 1) * 1_009 + epoch)
    return torch.randperm(size, generator=generator).tolist()


def collate(split: TokenizedSplit, indices: list[int], device: torch.device,
            length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest example (dynamic padding), or to ``length``.

    ``input_ids`` and every token column pad with 0; ``attention_mask`` is 1 on real tokens.
    """
    length = length or max(len(split.input_ids[i]) for i in indices)
    columns = {"input_ids": split.input_ids, **split.token_columns}
    batch = {name: torch.zeros(len(indices), length, dtype=torch.long) for name in columns}
    mask = torch.zeros(len(indices), length, dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(split.input_ids[i])
        for name, values in columns.items():
            batch[name][row, :n] = torch.tensor(values[i])
        mask[row, :n] = 1
    batch["attention_mask"] = mask
    dtype = torch.float32 if split.task.is_regression else torch.long
    batch["labels"] = torch.tensor([split.labels[i] for i in indices], dtype=dtype)
    return {k: v.to(device) for k, v in batch.items()}
