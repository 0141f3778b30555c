"""Loading encoder models of any transformers family: pretrained, randomly initialised from a
config, or a student cut from the teacher's layers."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from kdframe.api import EXTRACTABLE, MEMORY_PREFIX, LoadedModel, ModelError, TaskInfo, memory_object
from kdframe_hf.capture import capture_route
from kdframe_hf.sources import hub_offline, is_local, offline_problem, resolve_source
from kdframe_hf.tokenizer import has_tokenizer, load_tokenizer

#: ``tokenizer = "teacher"``: the student tokenises with the teacher's tokenizer, whatever its own
#: directory ships.
TEACHER_TOKENIZER = "teacher"


def load_model(role: str, spec: Any, task: TaskInfo, teacher: LoadedModel | None, base_dir: str,
               cache_dir: str) -> LoadedModel:
    """Build the ``role`` model from its spec (see ``kdframe.recipe.ModelSpec``)."""
    if spec.init == "teacher-layers":
        if teacher is None:
            raise ModelError(f"{role}: init = 'teacher-layers' needs a teacher (it is for the student only)")
        loaded = _from_teacher_layers(role, spec, teacher, base_dir, cache_dir)
    elif spec.init == "config":
        loaded = _from_config(role, spec, task, teacher, base_dir, cache_dir)
    else:
        loaded = _pretrained(role, spec, task, teacher, base_dir, cache_dir)
    if len(loaded.tokenizer) > loaded.vocab_size:
        raise ModelError(f"{role}: the tokenizer has {len(loaded.tokenizer)} tokens but the model's vocab_size is"
                         f" {loaded.vocab_size}; token ids would fall outside the embedding")
    if teacher is not None:
        check_same_vocabulary(loaded, teacher)
    return loaded


def _tokenizer(role: str, spec: Any, teacher: LoadedModel | None, base_dir: str, cache_dir: str,
               source: str | None = None) -> Any:
    """The recipe's tokenizer (``"teacher"``: the teacher's), else the model directory's own, else
    (for a student) the teacher's."""
    if spec.tokenizer == TEACHER_TOKENIZER:
        if teacher is None:
            raise ModelError(f"{role}.tokenizer = \"teacher\": only a student can use the teacher's tokenizer")
        return teacher.tokenizer
    if spec.tokenizer:
        return load_tokenizer(spec.tokenizer, base_dir, cache_dir)
    if source is not None and has_tokenizer(source):
        return load_tokenizer(source, base_dir, cache_dir)
    if teacher is not None:
        return teacher.tokenizer
    where = f"{source} has no tokenizer" if source else "init = 'config' needs a tokenizer"
    raise ModelError(f"{role}: {where}; set {role}.tokenizer (a model directory, a hub id, or 'builtin:chars')")


def _pretrained(role: str, spec: Any, task: TaskInfo, teacher: LoadedModel | None, base_dir: str,
                cache_dir: str) -> LoadedModel:
    if spec.model.startswith(MEMORY_PREFIX):
        return _in_memory(role, spec, task, teacher, base_dir, cache_dir)
    if not spec.model:
        raise ModelError(f"{role}.model is empty: give a model directory, a hub id or package:NAME")
    source = resolve_source(spec.model, base_dir, cache_dir)
    offline = hub_offline(source)  # then the local hub cache only: no retries, no noise
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(source, local_files_only=offline is not None)
    except Exception as exc:  # a bad directory or hub id is bad input, whatever transformers raises
        if offline is not None:
            raise offline_problem("model", source, offline) from None
        where = "" if is_local(source) else f" (no directory of that name under {base_dir}, so tried as a hub id)"
        raise ModelError(f"cannot load model {source!r}{where}: {type(exc).__name__}: {exc}") from exc
    trained_labels = config.num_labels if any("SequenceClassification" in a for a in config.architectures or ()) else None
    if trained_labels not in (None, task.num_labels):
        raise ModelError(f"{source} has a classifier with {trained_labels} labels, but task {task.name} has {task.num_labels}")
    _set_task(config, task)
    try:
        with quiet_transformers():
            # fp32 weights whatever dtype the checkpoint was saved in: mixed precision is autocast's job.
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, config=config, dtype=torch.float32, output_loading_info=True,
                local_files_only=offline is not None)
    except Exception as exc:
        raise ModelError(f"cannot load model weights from {source!r}: {type(exc).__name__}: {exc}") from exc
    tokenizer = _tokenizer(role, spec, teacher, base_dir, cache_dir, source)
    # A checkpoint without a task head (e.g. a plain BertModel) gets a fresh one: expected, so it
    # goes into the description instead of transformers' warning.
    missing = sorted(info["missing_keys"])
    loaded = _loaded(model, tokenizer, f"pretrained {source}", f"; newly initialised: {', '.join(missing)}" if missing else "")
    head = output_layer(model)
    head_name = next((name for name, module in model.named_modules() if module is head), None)
    if head_name is not None and {f"{head_name}.weight", f"{head_name}.bias"} & set(missing):
        loaded.fresh_head = head
    loaded.card.update(card_facts(source))
    return loaded


def _in_memory(role: str, spec: Any, task: TaskInfo, teacher: LoadedModel | None, base_dir: str,
               cache_dir: str) -> LoadedModel:
    """A model handed to kdframe.run: a copy (the caller's object is not trained in place), in fp32."""
    given = memory_object(spec.model)
    kind = type(given).__name__
    if not isinstance(given, PreTrainedModel) or not kind.endswith("ForSequenceClassification"):
        raise ModelError(f"{role}: kdframe.run takes a transformers sequence-classification model"
                         f" (AutoModelForSequenceClassification), not a {kind}")
    if given.config.num_labels != task.num_labels:
        raise ModelError(f"{role}: the {kind} handed to kdframe.run has {given.config.num_labels} labels, but task"
                         f" {task.name} has {task.num_labels}")
    if not spec.tokenizer and teacher is None:
        raise ModelError(f"{role}: an in-memory model comes without a tokenizer; pass tokenizer= to kdframe.run")
    model = copy.deepcopy(given).float()
    _set_task(model.config, task)
    origin = model.config.name_or_path
    loaded = _loaded(model, _tokenizer(role, spec, teacher, base_dir, cache_dir),
                     f"in-memory {kind}{f' (from {origin})' if origin else ''}", "")
    if origin and (Path(origin).is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", origin)):
        loaded.card.update(card_facts(origin))
    return loaded


def _from_config(role: str, spec: Any, task: TaskInfo, teacher: LoadedModel | None, base_dir: str,
                 cache_dir: str) -> LoadedModel:
    tokenizer = _tokenizer(role, spec, teacher, base_dir, cache_dir)
    keys = dict(spec.config)
    family = keys.pop("model_type", None)
    if teacher is not None and family not in (None, teacher.model.config.model_type):
        raise ModelError(f"{role}.config.model_type: {family!r}; a student built from a config is of the"
                         f" teacher's family ({teacher.model.config.model_type!r}): leave model_type out")
    # A student's unset keys come from the teacher, so it names only what it changes (e.g. layers).
    base = teacher.model.config if teacher is not None else _default_config(role, family or "bert")
    valid = config_keys(base)
    unknown = sorted(set(keys) - valid)
    if unknown:
        raise ModelError(f"{role}.config: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
    try:
        config = _with_keys(base, keys)
        if teacher is None:
            _fit_tokenizer(config, tokenizer, keys)
        _set_task(config, task)
        model = AutoModelForSequenceClassification.from_config(config)
    except Exception as exc:  # type checks of the config and shape checks of the model
        raise ModelError(f"{role}.config: cannot build a {base.model_type} model: {exc}") from exc
    loaded = _loaded(model, tokenizer, "random init from config", "")
    loaded.fresh_head = output_layer(model)
    return loaded


def _default_config(role: str, family: str) -> PreTrainedConfig:
    """The default config of ``family`` (``config.model_type`` in a recipe; BERT without one)."""
    try:
        return AutoConfig.for_model(family)
    except ValueError:
        raise ModelError(f"{role}.config.model_type: unknown model type {family!r} (transformers knows e.g. bert,"
                         " roberta, albert, modernbert, mpnet, deberta-v2)") from None


def _with_keys(base: PreTrainedConfig, keys: dict[str, Any]) -> PreTrainedConfig:
    """``base`` with ``keys`` set, built anew by its class so that what derives from them follows
    (a new layer count re-derives per-layer lists such as ModernBERT's ``layer_types``)."""
    values = base.to_dict()
    if {"num_hidden_layers", base.attribute_map.get("num_hidden_layers")} & set(keys):
        n = base.num_hidden_layers
        values = {k: v for k, v in values.items() if not (isinstance(v, list) and len(v) == n and k != "architectures")}
    return type(base).from_dict({**values, **keys})


def _fit_tokenizer(config: PreTrainedConfig, tokenizer: Any, keys: dict[str, Any]) -> None:
    """A new model's vocabulary and special token ids are its tokenizer's (unless the recipe says)."""
    config.vocab_size = keys.get("vocab_size", len(tokenizer))
    for name in ("pad", "bos", "eos", "cls", "sep", "unk", "mask"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None and hasattr(config, f"{name}_token_id") and f"{name}_token_id" not in keys:
            setattr(config, f"{name}_token_id", token_id)


def _from_teacher_layers(role: str, spec: Any, teacher: LoadedModel, base_dir: str, cache_dir: str) -> LoadedModel:
    layers, n = list(spec.layers), teacher.num_layers
    if not layers:
        raise ModelError(f"{role}.layers is empty: list the 0-indexed teacher layers to keep (the teacher has {n})")
    outside = [i for i in layers if not 0 <= i < n]
    if outside:
        raise ModelError(f"{role}.layers: {outside} out of range; the teacher has {n} layers, numbered 0..{n - 1}")
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        raise ModelError(f"{role}.layers: {repeated} listed more than once")
    model = copy.deepcopy(teacher.model)
    note = keep_layers(model, layers)
    # The engine may have frozen the teacher already; the copy is the student and must train.
    model.requires_grad_(True)
    loaded = _loaded(model, _tokenizer(role, spec, teacher, base_dir, cache_dir),
                     f"teacher layers {layers} (0-indexed, embeddings and classifier copied{note})", "")
    loaded.card.update({k: v for k, v in teacher.card.items() if k in ("license", "base_model")})
    if teacher.fresh_head is not None:  # copied before the teacher is fine-tuned: as new as the teacher's
        loaded.fresh_head = output_layer(model)
    return loaded


def output_layer(model: PreTrainedModel) -> nn.Linear | None:
    """The task head's last linear layer (the one giving the logits): found by structure, as every
    family names it differently (BERT ``classifier``, RoBERTa ``classifier.out_proj``...)."""
    encoder = {id(module) for module in model.base_model.modules()}
    outputs = [module for module in model.modules() if isinstance(module, nn.Linear) and id(module) not in encoder
               and module.out_features == model.config.num_labels]
    return outputs[-1] if outputs else None


def keep_layers(model: PreTrainedModel, layers: list[int]) -> str:
    """Cut ``model`` down to its encoder layers ``layers`` (0-indexed), in place; a note for the
    description when the cut means something special.

    The layer stack is found by structure: the one ModuleList under the base model with one entry
    per layer (``encoder.layer``, ``transformer.layer``, ``layers``...). Per-layer config lists
    (ModernBERT's ``layer_types``) are cut alike. ALBERT has no such list: its layers share one
    set of weights applied ``num_hidden_layers`` times, so a student of k layers applies the same
    weights k times, whichever indices are listed.
    """
    config, n = model.config, model.config.num_hidden_layers
    stacks = [(parent, name) for parent in model.base_model.modules() for name, child in parent.named_children()
              if isinstance(child, nn.ModuleList) and len(child) == n]
    if len(stacks) == 1:
        parent, name = stacks[0]
        setattr(parent, name, nn.ModuleList(getattr(parent, name)[i] for i in layers))
        note = ""
    elif getattr(config, "num_hidden_groups", 0) == 1:
        note = "; ALBERT shares its layer weights: the student applies them that many times"
    else:
        raise ModelError(f"cannot cut layers from a {config.model_type} model: found {len(stacks)} lists of its"
                         f" {n} layers under {type(model.base_model).__name__}; use init = 'config' for the student")
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(config, key, [value[i] for i in layers])
    config.num_hidden_layers = len(layers)
    return note


def check_same_vocabulary(student: LoadedModel, teacher: LoadedModel) -> None:
    """Distillation compares both models on the same token ids, so the vocabularies must agree."""
    ours, theirs = student.tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
    if student.vocab_size == teacher.vocab_size and ours == theirs:
        return
    pairs = zip(sorted(ours, key=ours.__getitem__), sorted(theirs, key=theirs.__getitem__))
    first = next((f"; first difference at id {i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(pairs) if a != b), "")
    raise ModelError(
        f"student and teacher vocabularies differ (student: {len(ours)} tokens, vocab_size {student.vocab_size};"
        f" teacher: {len(theirs)} tokens, vocab_size {teacher.vocab_size}{first});"
        " distillation compares both models on the same token ids: set student.tokenizer = \"teacher\" (the"
        " student's embeddings must then cover the teacher's vocabulary), or give the student a model of the"
        " teacher's vocabulary")


def config_keys(config: PreTrainedConfig) -> set[str]:
    """The architecture keys of ``config``'s class (e.g. hidden_size), not generic ones (e.g. dtype)."""
    generic = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    # Fields, attributes a config sets from them (DeBERTa's pooler_hidden_size), and aliases such
    # as DistilBERT's hidden_size -> dim.
    own = ({f.name for f in dataclasses.fields(config)} | set(config.to_dict())) - generic
    return {key for key in own if not key.startswith("_")} | set(config.attribute_map)


def export_model(loaded: LoadedModel, out_dir: str, max_length: int) -> str:
    """Save model and tokenizer in transformers' format; the tokenizer truncates at ``max_length``,
    the length the model was trained at.

    The attention implementation is runtime state, not written to config.json, so the export
    loads with the reader's default (sdpa) and never names kdframe's capture implementation.
    """
    with quiet_transformers():
        loaded.model.save_pretrained(out_dir)
    loaded.tokenizer.model_max_length = max_length
    loaded.tokenizer.save_pretrained(out_dir)
    return f"model ({_shape(loaded.model.config)}) and tokenizer in {Path(out_dir).resolve()}"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars while loading or saving.

    The report's only expected entry is the new classifier head, which the description states.
    """
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _set_task(config: PreTrainedConfig, task: TaskInfo) -> None:
    config.num_labels = task.num_labels
    config.problem_type = "regression" if task.is_regression else "single_label_classification"
    if not task.is_regression and len(task.names) == task.num_labels:
        # An exported model (and a pipeline on it) then shows the task's labels, not LABEL_0.
        config.id2label = dict(enumerate(task.names))
        config.label2id = {name: i for i, name in enumerate(task.names)}


def _loaded(model: PreTrainedModel, tokenizer: Any, origin: str, note: str) -> LoadedModel:
    config = model.config
    # Every family gives logits and hidden states; attention scores only with a capture route.
    features = frozenset(EXTRACTABLE) if capture_route(model) is not None else frozenset(EXTRACTABLE) - {"attn"}
    return LoadedModel(model=model, tokenizer=tokenizer, description=f"{origin}: {_shape(config)}{note}",
                       num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                       num_heads=config.num_attention_heads, vocab_size=config.vocab_size, features=features,
                       max_length=longest_input(model), card={"library_name": "transformers"})


def card_facts(source: str) -> dict[str, str]:
    """License and base model of a pretrained model, from the front matter of its model card
    (README.md in its directory, or in the local hub cache for a hub id); a hub id is itself the
    base model. Nothing is downloaded for this."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    facts = {} if is_local(source) else {"base_model": source}
    readme = Path(source) / "README.md" if is_local(source) else try_to_load_from_cache(source, "README.md")
    if not isinstance(readme, (str, Path)) or not Path(readme).is_file():
        return facts
    try:
        metadata = ModelCard.load(readme).data.to_dict()
    except Exception:  # a card that does not parse says nothing; the export still works
        return facts
    if isinstance(metadata.get("license"), str):
        facts["license"] = metadata["license"]
    if isinstance(metadata.get("base_model"), str):
        facts.setdefault("base_model", metadata["base_model"])
    return facts


def longest_input(model: PreTrainedModel) -> int | None:
    """How many tokens the model's position embeddings cover: ``max_position_embeddings``, less
    the offset of families that number positions after the padding id (RoBERTa, MPNet); None for
    models without absolute positions (DeBERTa-v2 as configured by default)."""
    config = model.config
    if getattr(config, "position_biased_input", True) is False or not hasattr(config, "max_position_embeddings"):
        return None
    offset = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
    return config.max_position_embeddings - (offset + 1 if isinstance(offset, int) else 0)


def _shape(config: PreTrainedConfig) -> str:
    return (f"{config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size},"
            f" {config.num_attention_heads} heads, vocab {config.vocab_size}")
