"""Loading BERT-like models: pretrained, randomly initialised from a config, or teacher layers."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from kdframe.api import LoadedModel, ModelError, TaskInfo
from kdframe_hf.sources import is_local, resolve_source
from kdframe_hf.tokenizer import has_tokenizer, load_tokenizer

#: Model types whose self-attention goes through transformers' AttentionInterface (so scores
#: can be captured), with the base-model attribute holding the ``layer`` list.
SUPPORTED = {"bert": "encoder", "roberta": "encoder", "xlm-roberta": "encoder", "electra": "encoder",
             "distilbert": "transformer"}


def load_model(role: str, spec: Any, task: TaskInfo, teacher: LoadedModel | None, base_dir: str) -> LoadedModel:
    """Build the ``role`` model from its spec (see ``kdframe.recipe.ModelSpec``)."""
    if spec.init == "teacher-layers":
        if teacher is None:
            raise ModelError(f"{role}: init = 'teacher-layers' needs a teacher (it is for the student only)")
        loaded = _from_teacher_layers(role, spec, teacher, base_dir)
    elif spec.init == "config":
        loaded = _from_config(role, spec, task, teacher, base_dir)
    else:
        loaded = _pretrained(role, spec, task, teacher, base_dir)
    if len(loaded.tokenizer) > loaded.vocab_size:
        raise ModelError(f"{role}: the tokenizer has {len(loaded.tokenizer)} tokens but the model's vocab_size is"
                         f" {loaded.vocab_size}; token ids would fall outside the embedding")
    if teacher is not None:
        check_same_vocabulary(loaded, teacher)
    return loaded


def _pretrained(role: str, spec: Any, task: TaskInfo, teacher: LoadedModel | None, base_dir: str) -> LoadedModel:
    if not spec.model:
        raise ModelError(f"{role}.model is empty: give a model directory, a hub id or package:NAME")
    source = resolve_source(spec.model, base_dir)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # a bad directory or hub id is bad input, whatever transformers raises
        where = "" if is_local(source) else f" (no directory of that name under {base_dir}, so tried as a hub id)"
        raise ModelError(f"cannot load model {source!r}{where}: {type(exc).__name__}: {exc}") from exc
    check_supported(config, source)
    trained_labels = config.num_labels if any("SequenceClassification" in a for a in config.architectures or ()) else None
    if trained_labels not in (None, task.num_labels):
        raise ModelError(f"{source} has a classifier with {trained_labels} labels, but task {task.name} has {task.num_labels}")
    _set_task(config, task)
    try:
        with quiet_transformers():
            # fp32 weights whatever dtype the checkpoint was saved in: mixed precision is autocast's job.
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, config=config, dtype=torch.float32, output_loading_info=True)
    except Exception as exc:
        raise ModelError(f"cannot load model weights from {source!r}: {type(exc).__name__}: {exc}") from exc
    if spec.tokenizer:
        tokenizer = load_tokenizer(spec.tokenizer, base_dir)
    elif has_tokenizer(source):
        tokenizer = load_tokenizer(source, base_dir)
    elif teacher is not None:
        tokenizer = teacher.tokenizer
    else:
        raise ModelError(f"{role}: {source} has no tokenizer; set {role}.tokenizer")
    # A checkpoint without a task head (e.g. a plain BertModel) gets a fresh one: expected, so it
    # goes into the description instead of transformers' warning.
    missing = sorted(info["missing_keys"])
    return _loaded(model, tokenizer, f"pretrained {source}", f"; newly initialised: {', '.join(missing)}" if missing else "")


def _from_config(role: str, spec: Any, task: TaskInfo, teacher: LoadedModel | None, base_dir: str) -> LoadedModel:
    if spec.tokenizer:
        tokenizer = load_tokenizer(spec.tokenizer, base_dir)
    elif teacher is not None:
        tokenizer = teacher.tokenizer
    else:
        raise ModelError(f"{role}: init = 'config' needs {role}.tokenizer (e.g. 'builtin:chars' or a model directory)")
    # Unset keys come from the teacher, so a student only names what it changes (e.g. layers).
    config = copy.deepcopy(teacher.model.config) if teacher is not None else BertConfig(vocab_size=len(tokenizer))
    valid = config_keys(config)
    unknown = sorted(set(spec.config) - valid)
    if unknown:
        raise ModelError(f"{role}.config: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
    try:
        for key, value in spec.config.items():
            setattr(config, key, value)
        _set_task(config, task)
        model = AutoModelForSequenceClassification.from_config(config)
    except Exception as exc:  # type checks of the config and shape checks of the model
        raise ModelError(f"{role}.config: cannot build a {config.model_type} model: {exc}") from exc
    return _loaded(model, tokenizer, "random init from config", "")


def _from_teacher_layers(role: str, spec: Any, teacher: LoadedModel, base_dir: str) -> LoadedModel:
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
    holder = getattr(model.base_model, SUPPORTED[model.config.model_type])
    holder.layer = nn.ModuleList(holder.layer[i] for i in layers)
    model.config.num_hidden_layers = len(layers)
    # The engine may have frozen the teacher already; the copy is the student and must train.
    model.requires_grad_(True)
    tokenizer = load_tokenizer(spec.tokenizer, base_dir) if spec.tokenizer else teacher.tokenizer
    return _loaded(model, tokenizer, f"teacher layers {layers} (0-indexed, embeddings and classifier copied)", "")


def check_supported(config: PreTrainedConfig, source: str) -> None:
    if config.model_type not in SUPPORTED:
        raise ModelError(f"cannot capture layers of model type {config.model_type!r} ({source});"
                         f" supported: {', '.join(SUPPORTED)}")


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
        " use the teacher's tokenizer for the student (leave student.tokenizer empty)")


def config_keys(config: PreTrainedConfig) -> set[str]:
    """The architecture keys of ``config``'s class (e.g. hidden_size), not generic ones (e.g. dtype)."""
    generic = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    own = {f.name for f in dataclasses.fields(config)} - generic
    return own | set(config.attribute_map)  # aliases such as DistilBERT's hidden_size -> dim


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
    return LoadedModel(model=model, tokenizer=tokenizer, description=f"{origin}: {_shape(config)}{note}",
                       num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                       num_heads=config.num_attention_heads, vocab_size=config.vocab_size)


def _shape(config: PreTrainedConfig) -> str:
    return (f"{config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size},"
            f" {config.num_attention_heads} heads, vocab {config.vocab_size}")
