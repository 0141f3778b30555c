"""A cache of the frozen teacher's features, per training example (recipe section ``[teacher_cache]``).

The teacher is frozen and in eval mode during distillation, so what it returns for an example
never changes: its features are computed the first time the example is seen and reused in later
epochs, and with ``storage = "disk"`` by later runs and by every ablation cell sharing the
teacher, the data and the feature set.

Why a per-example cache reproduces a teacher forward on any batch: with an attention mask, the
features of an example at position p, real token or padding, depend neither on how many pad
tokens follow nor on the other examples of the batch (pad keys are masked, dropout is off). So
each example is stored padded to the longest example of the split (the longest length a batch can
have) and sliced to the batch's padded length when a batch is assembled; padding positions come
out as a forward on that batch gives them (the default losses count padding, docs/method.md 1). Only
float rounding differs: CPU kernels for other batch shapes differ at about 1e-7 (fp32 storage).

Layout per example: ``logits`` (C,) or () for regression; ``hidden`` (layers + 1, S, d), or
(layers + 1, 1, d) when only ``cls`` is needed (the first position: it does not depend on
padding either, so such entries are stored unpadded); ``attn`` (layers, heads, S, n) where n is
the example's real length: masked key columns are 0 by the Features contract, so they are dropped
when stored and restored as zeros. S is the longest example of the split (at most
``data.max_length``).

The key (``cache_key``) covers the teacher's weights (a hash of the state_dict bytes, taken after
fine-tuning), its class and config, the tokenizer, the tokenised split, ``data.max_length``, the
feature set, the storage dtype and the recipe's precision (under autocast the teacher returns
other numbers). Any change gives a new key, hence a fresh cache directory.

Budget: past ``max_bytes`` (bytes of stored tensors; on disk, of the files already there plus the
new ones) nothing more is stored; the rest is computed live on every step, as without a cache. A
file that cannot be written (a full disk) ends storing the same way, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdframe.caches import cache_root, mark_used, stored_examples
from kdframe.checkpoint import weights_digest
from kdframe.errors import KdframeWarning
from kdframe.fileio import atomic_write
from kdframe.tokens import tokenizer_identity
from kdframe.types import Features, TokenizedSplit, extracted

FORMAT = 1  # bump when the stored layout changes: old cache directories are then ignored
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Features whose tensors have a sequence axis; without them (logits only) padding does not matter.
SEQUENCE_FEATURES = frozenset({"hidden", "attn"})

Entry = dict[str, Any]  # one example: tensors (CPU, storage dtype) and "dtypes" (what the forward returned)


# -- the key --------------------------------------------------------------------------------------

def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def split_digest(split: TokenizedSplit) -> str:
    """The tokenised examples, in order (the cache is indexed by position in the split): per
    example, its length, its ids and then each other token column's values (by name), as int64."""
    import pyarrow.compute as pc

    digest = hashlib.sha256(f"{split.task.name}|{split.split}|{len(split)}|".encode())
    columns = ["input_ids", *sorted(split.token_columns[1:])]
    for chunk in split.table.select(columns).to_batches(max_chunksize=8192):
        lengths = pc.list_value_length(chunk.column(0)).to_numpy().astype(np.int64)
        starts = np.cumsum(1 + lengths * len(columns)) - (1 + lengths * len(columns))
        flat = np.empty(int((1 + lengths * len(columns)).sum()), dtype=np.int64)
        flat[starts] = lengths
        row = np.repeat(np.arange(len(lengths)), lengths)  # the example of each token
        position = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        for j in range(len(columns)):
            flat[starts[row] + 1 + lengths[row] * j + position] = chunk.column(j).flatten().to_numpy()
        digest.update(flat.tobytes())
    return digest.hexdigest()


def key_parts(model: torch.nn.Module, tokenizer: Any, split: TokenizedSplit, max_length: int,
              needs: frozenset[str], dtype: str, precision: str) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "format": FORMAT,
        "weights": weights_digest(model),
        "model": type(model).__qualname__,
        "config": _sha(config.to_dict()) if hasattr(config, "to_dict") else "",
        "tokenizer": tokenizer_identity(tokenizer),
        "split": split_digest(split),
        "max_length": max_length,
        "needs": sorted(needs),
        "dtype": dtype,
        "precision": precision,
    }


def cache_key(parts: dict[str, Any]) -> str:
    return _sha(parts)[:24]


# -- the cache -----------------------------------------------------------------------------------

def open_teacher_cache(recipe: Any, teacher: Any, split: TokenizedSplit, tokenizer: Any, needs: frozenset[str],
                       compute: Callable[[dict[str, torch.Tensor]], Features]) -> "TeacherCache | None":
    """The cache a distillation stage uses, or None when ``[teacher_cache]`` is off.

    ``compute(batch)`` is the normal teacher forward (the engine's feature hook, under its
    autocast and no_grad); ``tokenizer`` is the one that tokenised ``split``.
    """
    spec = recipe.teacher_cache
    if not spec.enabled:
        return None
    parts = key_parts(teacher.model, tokenizer, split, recipe.data.max_length, needs, spec.dtype, recipe.precision)
    directory = None
    if spec.storage == "disk":
        directory = cache_root(recipe.data) / "teacher-features" / cache_key(parts)
    return TeacherCache(compute, split, needs, spec.dtype, spec.max_bytes, cache_key(parts), directory, parts)


class TeacherCache:
    """Teacher features per training example; ``features(indices, batch)`` replaces the forward."""

    def __init__(self, compute: Callable[[dict[str, torch.Tensor]], Features], split: TokenizedSplit,
                 needs: frozenset[str], dtype: str = "fp32", max_bytes: int = 4_000_000_000, key: str = "",
                 directory: Path | None = None, parts: dict[str, Any] | None = None):
        self.compute = compute
        self.needs = needs
        self.dtype = STORAGE_DTYPES[dtype]
        self.max_bytes = max_bytes
        self.key = key
        self.directory = directory
        # Every batch is at most this long; logits-only and [CLS]-only entries need no padding at all.
        self.length = int(split.lengths().max()) if needs & SEQUENCE_FEATURES else None
        self.hidden_length = self.length if "hidden" in needs else 1  # positions a stored hidden state keeps
        self.memory: dict[int, Entry] = {}
        self.on_disk: set[int] = set()
        self.bytes = 0
        self.full = False
        self.write_error: str | None = None  # why storing stopped early, when a write failed
        self.hits = self.misses = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            stored = stored_examples(directory)
            self.on_disk, self.bytes = set(stored), sum(stored.values())
            meta = directory / "key.json"
            if meta.exists():
                mark_used(meta)
            else:  # the parts, and what they stand for (for kdframe cache; not hashed)
                about = {**(parts or {}), "task": split.task.name, "split": split.split}
                atomic_write(meta, lambda f: f.write(json.dumps(about, indent=2, sort_keys=True).encode()))

    def stats(self) -> dict[str, Any]:
        """For the stage summary: examples served from the cache (hits) and run through the teacher
        (misses), bytes stored, examples stored."""
        stats = {"hits": self.hits, "misses": self.misses, "bytes": self.bytes,
                 "examples": len(self.on_disk) + len(self.memory), "full": self.full,
                 "storage": "disk" if self.directory is not None else "memory", "key": self.key}
        return stats | ({"write_error": self.write_error} if self.write_error else {})

    # -- the one call the engine makes ------------------------------------------------------------
    def features(self, indices: list[int], batch: dict[str, torch.Tensor]) -> Features:
        """The teacher's features of ``batch`` (whose rows are the examples ``indices``)."""
        entries = [self._get(i) for i in indices]
        missing = [row for row, entry in enumerate(entries) if entry is None]
        if not missing:
            self.hits += len(indices)
            return self._assemble(entries, batch)
        if self.full and len(missing) == len(indices):
            self.misses += len(indices)
            return self.compute(batch)  # nothing cached, nothing to store: the plain forward
        # Run the teacher on the missing examples only, padded to the storage length when storing.
        rows = torch.tensor(missing, device=batch["input_ids"].device)
        sub = {name: value[rows] for name, value in batch.items()}
        if not self.full and self.length is not None:
            sub = _pad(sub, self.length)
        live = self.compute(sub)
        for j, entry in enumerate(self._split(live, sub["attention_mask"])):
            entries[missing[j]] = entry
            if not self.full:
                self._put(indices[missing[j]], entry)
        self.misses += len(missing)
        self.hits += len(indices) - len(missing)
        return self._assemble(entries, batch)

    # -- storage ----------------------------------------------------------------------------------
    def _file(self, index: int) -> Path:
        return self.directory / f"{index}.pt"

    def _get(self, index: int) -> Entry | None:
        if self.directory is None:
            return self.memory.get(index)
        if index not in self.on_disk:
            return None
        try:
            entry = torch.load(self._file(index), map_location="cpu", weights_only=True)
        except Exception:  # torn or foreign file: compute again and rewrite it
            entry = None
        if not self._fits(entry):  # a file that loads but holds something else: the same
            self.on_disk.discard(index)
            return None
        return entry

    def _fits(self, entry: Any) -> bool:
        """A stored entry has this cache's features, stored at its length and dtype (cheap checks
        of shapes only: a wrong file must not reach a batch)."""
        if not isinstance(entry, dict) or not isinstance(entry.get("dtypes"), dict):
            return False
        wanted = {"logits"} | (extracted(self.needs) & SEQUENCE_FEATURES)
        if set(entry["dtypes"]) != wanted or not all(isinstance(entry.get(k), torch.Tensor) for k in wanted):
            return False
        if any(entry[k].dtype != self.dtype for k in wanted):
            return False
        hidden, attn = entry.get("hidden"), entry.get("attn")
        return ((hidden is None or (hidden.dim() == 3 and hidden.shape[1] == self.hidden_length))
                and (attn is None or (attn.dim() == 4 and attn.shape[2] == self.length)))

    def _put(self, index: int, entry: Entry) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.values() if isinstance(t, torch.Tensor))
        if self.bytes + size > self.max_bytes:
            self.full = True  # stop storing; the rest is computed live
            return
        if self.directory is None:
            self.memory[index] = entry
        else:
            # No fsync: a torn file after a crash fails to load and is recomputed.
            try:
                atomic_write(self._file(index), lambda f: torch.save(entry, f))
            except OSError as exc:
                # The cache only saves time: a full disk must not stop a run hours in.
                self.full = True
                self.write_error = exc.strerror or str(exc)
                warnings.warn(f"teacher feature cache {self.directory}: cannot write ({self.write_error}): nothing"
                              " more is stored, the rest of the stage runs the teacher live", KdframeWarning,
                              stacklevel=1)
                return
            self.on_disk.add(index)
        self.bytes += size

    # -- splitting a forward into examples, assembling a batch from examples ------------------------
    def _split(self, live: Features, mask: torch.Tensor) -> list[Entry]:
        dtypes: dict[str, Any] = {}
        logits = hidden = attn = None
        if live.logits is not None:
            dtypes["logits"] = str(live.logits.dtype).removeprefix("torch.")
            logits = live.logits.detach().to("cpu", self.dtype)
        if live.hidden is not None:
            dtypes["hidden"] = [str(h.dtype).removeprefix("torch.") for h in live.hidden]
            hidden = torch.stack([h.detach().to(self.dtype) for h in live.hidden], 1).cpu()  # (B, layers+1, S, d)
        if live.attn is not None:
            dtypes["attn"] = [str(a.dtype).removeprefix("torch.") for a in live.attn]
            attn = torch.stack([a.detach().to(self.dtype) for a in live.attn], 1).cpu()  # (B, layers, h, S, S)
        lengths = mask.sum(1).tolist()
        entries = []
        for j, n in enumerate(lengths):
            entry: Entry = {"dtypes": dtypes}
            if logits is not None:
                entry["logits"] = logits[j].clone()
            if hidden is not None:
                entry["hidden"] = hidden[j].clone()
            if attn is not None:
                a = attn[j]
                # Right padding with masked keys zeroed (the Features contract): keep the real keys only.
                if bool(mask[j, :n].all()) and not torch.any(a[..., n:]):
                    a = a[..., :n]
                entry["attn"] = a.clone(memory_format=torch.contiguous_format)
            entries.append(entry)
        return entries

    def _assemble(self, entries: list[Entry], batch: dict[str, torch.Tensor]) -> Features:
        device = batch["input_ids"].device
        length = batch["input_ids"].shape[1]
        dtypes = entries[0]["dtypes"]

        def out(t: torch.Tensor, dtype: str) -> torch.Tensor:
            return t.to(device, getattr(torch, dtype), non_blocking=True)

        logits = hidden = attn = None
        if "logits" in dtypes:
            logits = out(torch.stack([e["logits"] for e in entries]), dtypes["logits"])
        if "hidden" in dtypes:
            stacked = torch.stack([e["hidden"][:, :length] for e in entries], 1)  # (layers+1, B, L, d)
            hidden = tuple(out(h, dt) for h, dt in zip(stacked.unbind(0), dtypes["hidden"]))
        if "attn" in dtypes:
            first = entries[0]["attn"]
            stacked = torch.zeros(first.shape[0], len(entries), first.shape[1], length, length, dtype=first.dtype)
            for b, e in enumerate(entries):
                keys = min(e["attn"].shape[-1], length)
                stacked[:, b, :, :, :keys] = e["attn"][:, :, :length, :keys]
            attn = tuple(out(a, dt) for a, dt in zip(stacked.unbind(0), dtypes["attn"]))
        return Features(logits=logits, mask=batch["attention_mask"], hidden=hidden, attn=attn)


def _pad(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Right-pad every (B, L) tensor with zeros to ``length``, as ``kdframe.batches.collate`` pads."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    return {name: torch.nn.functional.pad(value, (0, extra)) if value.dim() == 2 else value
            for name, value in batch.items()}

