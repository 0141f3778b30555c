"""Feature capture: logits, hidden states and pre-softmax attention scores of BERT-like models.

transformers only exposes attention *probabilities* (``output_attentions``); distillation needs
the scores before the softmax (docs/method.md section 1). A capturing forward therefore runs under
an attention implementation registered here, ``kdframe_capture``: eager attention that also
records ``QK^T/sqrt(d_head) + mask`` of every layer. The model keeps its own implementation
(normally sdpa) for every other forward; ``capturing`` swaps ours in for one call only.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Iterator

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from kdframe.api import Features, ModelError

CAPTURE = "kdframe_capture"

#: Masked keys hold the dtype minimum in transformers 5 (-10000 in older code): anything at or
#: below this is the mask, never a real score.
MASKED = -100.0

# The list the running capture appends to; outside ``capturing`` it is None and
# ``capture_attention`` is plain eager attention.
_scores: ContextVar[list[torch.Tensor] | None] = ContextVar("kdframe_hf_scores", default=None)


def capture_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention, plus recording the scores; returns what eager returns."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    recorded = _scores.get()
    if recorded is not None:
        # Zero the masked keys: squared, the mask value would swamp any loss (docs/method.md 8.1).
        # The recorded tensor keeps its graph: the student's attention loss backpropagates here.
        kept = scores if attention_mask is None else scores.masked_fill(attention_mask <= MASKED, 0.0)
        recorded.append(kept)
    weights = nn.functional.softmax(scores, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


AttentionInterface.register(CAPTURE, capture_attention)
# Without a mask function under the same name transformers builds no mask at all and passes
# attention_mask=None, so padded keys would be attended to.
AttentionMaskInterface.register(CAPTURE, eager_mask)


@contextlib.contextmanager
def capturing(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """Run the forwards inside under ``kdframe_capture``; yields the list the scores go to.

    The implementation is read from the (shared) config at every forward, so switching it is a
    single attribute write, undone afterwards so plain forwards stay on the fast path.
    """
    scores: list[torch.Tensor] = []
    token = _scores.set(scores)
    previous = model.config._attn_implementation
    model.config._attn_implementation = CAPTURE
    try:
        yield scores
    finally:
        model.config._attn_implementation = previous
        _scores.reset(token)


def extract_features(model: PreTrainedModel, batch: dict[str, torch.Tensor], needs: frozenset[str]) -> Features:
    """One forward of ``model`` on ``batch``; hidden states and scores only when ``needs`` asks."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # RoBERTa has a single token type and DistilBERT none: segment ids would be out of range.
    if getattr(model.config, "type_vocab_size", 0) > 1:
        inputs["token_type_ids"] = batch["token_type_ids"]
    want_attn = "attn" in needs
    with capturing(model) if want_attn else contextlib.nullcontext([]) as scores:
        output = model(**inputs, output_hidden_states="hidden" in needs)
    if want_attn and len(scores) != model.config.num_hidden_layers:
        raise ModelError(
            f"captured attention scores of {len(scores)} layers, expected {model.config.num_hidden_layers}:"
            f" {type(model).__name__} does not route its attention through transformers' AttentionInterface"
        )
    logits = output.logits.squeeze(-1) if model.config.num_labels == 1 else output.logits
    return Features(
        logits=logits,
        mask=batch["attention_mask"],
        hidden=tuple(output.hidden_states) if "hidden" in needs else None,
        attn=tuple(scores) if want_attn else None,
    )
