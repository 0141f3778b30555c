"""Objects handed to ``kdframe.run`` in Python (models, a tokenizer, datasets), named in the
recipe as ``memory:KIND-DIGEST``.

A recipe stays data: its model and dataset fields hold these names, and the plugins that read
those fields (the hf model loader, the text data source) take the objects from here. The digest
is of the content (weights and config, vocabulary, rows), so the same objects give the same
resolved recipe in another process: a run resumes and the teacher and token caches hit; different
objects never share a cache entry.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kdframe.errors import KdframeError

PREFIX = "memory:"
_objects: dict[str, Any] = {}


def put(kind: str, obj: Any) -> str:
    """Keep ``obj`` (a ``model``, ``tokenizer`` or ``datasets``: a dict of split name to
    ``datasets.Dataset``) for this process; the name recipes give it."""
    digest = {"model": _model_digest, "tokenizer": _tokenizer_digest, "datasets": _datasets_digest}[kind](obj)
    name = f"{PREFIX}{kind}-{digest[:20]}"
    _objects[name] = obj
    return name


def get(name: str) -> Any:
    """The object ``put`` named ``name``."""
    try:
        return _objects[name]
    except KeyError:
        raise KdframeError(f"{name}: an object handed to kdframe.run in the Python process that started the run;"
                           " it exists only there: call kdframe.run again with the same objects"
                           " (and resume=RUN_DIR to continue a run)") from None


def _model_digest(model: Any) -> str:
    import torch

    from kdframe.checkpoint import weights_digest

    if not isinstance(model, torch.nn.Module):
        raise KdframeError(f"expected a torch model (a torch.nn.Module), got {type(model).__name__}")
    config = getattr(model, "config", None)
    described = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else ""
    return hashlib.sha256(f"{type(model).__name__}|{described}|{weights_digest(model)}".encode()).hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    from kdframe.tokens import tokenizer_identity

    if not hasattr(tokenizer, "get_vocab"):
        raise KdframeError(f"expected a tokenizer (with get_vocab()), got {type(tokenizer).__name__}")
    settings = f"{getattr(tokenizer, 'model_max_length', '')}|{getattr(tokenizer, 'padding_side', '')}"
    return hashlib.sha256(f"{tokenizer_identity(tokenizer)}|{settings}".encode()).hexdigest()


def _datasets_digest(splits: dict[str, Any]) -> str:
    """The rows and features of each split (Arrow IPC bytes, batch by batch: memory stays flat)."""
    import datasets
    import pyarrow as pa

    digest = hashlib.sha256()
    for split, dataset in splits.items():
        if not isinstance(dataset, datasets.Dataset):
            raise KdframeError(f"{split}: expected a datasets.Dataset, got {type(dataset).__name__}")
        digest.update(f"{split}\0{len(dataset)}\0".encode())
        for table in dataset.with_format("arrow").iter(batch_size=10_000):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            digest.update(sink.getvalue())
    return digest.hexdigest()
