"""Feature capture: logits, hidden states and pre-softmax attention scores of encoder models.

transformers only exposes attention *probabilities* (``output_attentions``); distillation needs
the scores before the softmax (docs/method.md section 1). How to get them depends on the family:

- families whose attention goes through transformers' ``AttentionInterface`` (BERT, RoBERTa,
  XLM-R, ELECTRA, DistilBERT, ALBERT, ModernBERT, ...) run a capturing forward under an
  implementation registered here, ``kdframe_capture``: eager attention that also records
  ``QK^T/sqrt(d_head) + mask`` of every layer. The model keeps its own implementation (normally
  sdpa) for every other forward; ``interface_capture`` swaps ours in for one call only;
- families that compute attention in their own code (MPNet, DeBERTa-v2) get an adapter:
  ``softmax_capture`` records the input of the softmax their self-attention modules apply, which
  is the masked pre-softmax score matrix, without changing any computation;
- any other family: ``register_capture(model_type, adapter)`` adds one (a plugin for a family of
  its own calls it at import); without a route a model still gives logits and hidden states.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, ContextManager, Iterator

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from kdframe.api import Features, ModelError

CAPTURE = "kdframe_capture"

#: An additive mask holds the dtype minimum at masked keys in transformers 5 (-10000 in older
#: code): a mask entry at or below this hides its key. Only masks are compared with it, never
#: scores, so a real key keeps its score however negative.
MASKED = -100.0

# The list the running capture appends to; outside ``interface_capture`` it is None and
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
    # Scaled and masked in the product's own buffer (matmul's backward needs its inputs, not its
    # output): the same operations in the same order as eager attention, one (B, h, L, L) tensor.
    scores = torch.matmul(query, key.transpose(2, 3)).mul_(scaling)
    if attention_mask is not None:
        # Under autocast the bf16 product is promoted to the fp32 mask's dtype, as eager attention does.
        scores = scores.add_(attention_mask) if scores.dtype == attention_mask.dtype else scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1)
    recorded = _scores.get()
    if recorded is not None:
        if attention_mask is not None:
            # Zero the masked keys: squared, the mask value would swamp any loss (docs/method.md
            # 8.1). In place, after the softmax has read the scores (its backward needs its output,
            # not its input); the recorded tensor keeps its graph for the attention loss.
            scores.masked_fill_(masked_keys(attention_mask), 0.0)
        recorded.append(scores)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


AttentionInterface.register(CAPTURE, capture_attention)
# Without a mask function under the same name transformers builds no mask at all and passes
# attention_mask=None, so padded keys would be attended to.
AttentionMaskInterface.register(CAPTURE, eager_mask)


#: A capture route: given a model, a context in which its forwards record every layer's masked
#: pre-softmax scores (B, heads, L, L) into the list it yields, in layer order.
CaptureAdapter = Callable[[PreTrainedModel], ContextManager[list[torch.Tensor]]]


def masked_keys(attention_mask: torch.Tensor) -> torch.Tensor:
    """Where an attention mask hides the key: the false / 0 entries of a boolean or 0/1 mask, the
    large negative entries of an additive one; broadcastable against the scores."""
    if attention_mask.dtype.is_floating_point:
        return attention_mask <= MASKED
    return attention_mask == 0


@contextlib.contextmanager
def interface_capture(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
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


# -- families with attention code of their own --------------------------------------------------

_softmax = torch.nn.functional.softmax
# While an attention module runs, until its first softmax over keys: the list it records into and
# the mask it was given (None: no mask).
_pending: ContextVar[tuple[list[torch.Tensor], torch.Tensor | None] | None] = ContextVar("kdframe_hf_pending", default=None)


def _recording_softmax(input: torch.Tensor, dim: int | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    pending = _pending.get()
    if pending is not None and dim is not None and dim in (-1, input.dim() - 1):
        _pending.set(None)  # one score matrix per attention call
        target, mask = pending
        # Zero the keys the module's mask hides: squared, the mask value would swamp any loss
        # (docs/method.md 8.1). The recorded tensor keeps its graph for the attention loss.
        target.append(input if mask is None else input.masked_fill(masked_keys(mask), 0.0))
    return _softmax(input, dim, *args, **kwargs)


def softmax_capture(*attention_classes: str, mask_argument: str = "attention_mask") -> CaptureAdapter:
    """An adapter for families whose self-attention modules (the classes named) compute
    ``softmax(scores + mask)`` in their own code: while such a module runs, the first softmax over
    the last dimension records its input, with the keys hidden by the module's ``mask_argument``
    set to 0. Nothing is recomputed, so the model's outputs, and dropout's random numbers, are what
    they would be without the capture."""

    @contextlib.contextmanager
    def capture(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
        scores: list[torch.Tensor] = []
        modules = [m for m in model.modules() if type(m).__name__ in attention_classes]
        signatures = {type(m): inspect.signature(m.forward) for m in modules}
        for cls, signature in signatures.items():
            if mask_argument not in signature.parameters:
                raise ModelError(f"{cls.__name__}.forward has no {mask_argument!r} argument, so its masked keys cannot"
                                 " be told from real ones (softmax_capture's mask_argument names it)")

        def start(module: nn.Module, args: Any, kwargs: Any) -> None:
            bound = signatures[type(module)].bind_partial(*args, **kwargs)
            _pending.set((scores, bound.arguments.get(mask_argument)))

        def end(module: nn.Module, args: Any, output: Any) -> None:
            _pending.set(None)

        handles = [h for m in modules
                   for h in (m.register_forward_pre_hook(start, with_kwargs=True), m.register_forward_hook(end))]
        torch.nn.functional.softmax = _recording_softmax
        try:
            yield scores
        finally:
            torch.nn.functional.softmax = _softmax
            _pending.set(None)
            for handle in handles:
                handle.remove()

    return capture


_ADAPTERS: dict[str, CaptureAdapter] = {
    "mpnet": softmax_capture("MPNetSelfAttention"),
    "deberta-v2": softmax_capture("DisentangledSelfAttention"),
}


def register_capture(model_type: str, adapter: CaptureAdapter) -> None:
    """Make the attention scores of ``model_type`` models capturable (for a plugin adding a family)."""
    if model_type in _ADAPTERS:
        raise ModelError(f"a capture adapter for model type {model_type!r} is registered already")
    _ADAPTERS[model_type] = adapter


def capture_route(model: PreTrainedModel) -> CaptureAdapter | None:
    """How to capture ``model``'s attention scores: its family's adapter, the AttentionInterface
    swap when its modeling code dispatches attention through transformers' registry, else None."""
    adapter = _ADAPTERS.get(model.config.model_type)
    if adapter is not None:
        return adapter
    modeling = sys.modules.get(type(model).__module__)
    return interface_capture if modeling is not None and "ALL_ATTENTION_FUNCTIONS" in vars(modeling) else None


def extract_features(model: PreTrainedModel, batch: dict[str, torch.Tensor], needs: frozenset[str]) -> Features:
    """One forward of ``model`` on ``batch``; hidden states and scores only when ``needs`` asks."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # RoBERTa has a single token type and DistilBERT none: segment ids would be out of range. A
    # tokenizer without them (MPNet's) leaves them out: the model then takes type 0 throughout.
    if getattr(model.config, "type_vocab_size", 0) > 1 and "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    want_attn = "attn" in needs
    route = capture_route(model) if want_attn else None
    if want_attn and route is None:
        raise ModelError(f"{model.config.model_type} models give no attention scores to kdframe: their attention"
                         " is neither dispatched through transformers' AttentionInterface nor covered by a capture"
                         " adapter (kdframe_hf.capture.register_capture)")
    try:
        with route(model) if want_attn else contextlib.nullcontext([]) as scores:
            output = model(**inputs, output_hidden_states="hidden" in needs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # the model cannot run on such a batch
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelError(f"a {model.config.model_type} model's forward failed on a batch of {tuple(inputs['input_ids'].shape)}"
                         f" token ids: {type(exc).__name__}: {first}") from exc
    if want_attn and len(scores) != model.config.num_hidden_layers:
        raise ModelError(f"captured attention scores of {len(scores)} layers, expected {model.config.num_hidden_layers}"
                         f" ({type(model).__name__})")
    logits = output.logits.squeeze(-1) if model.config.num_labels == 1 else output.logits
    return Features(
        logits=logits,
        mask=batch["attention_mask"],
        hidden=tuple(output.hidden_states) if "hidden" in needs else None,
        attn=tuple(scores) if want_attn else None,
    )
