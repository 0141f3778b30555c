"""Tokenizers: the model's own, one named in the recipe, or the built-in character tokenizer."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, BertTokenizer

from kdframe.api import MEMORY_PREFIX, ModelError, memory_object
from kdframe_hf.sources import hub_offline, is_local, offline_problem, resolve_source

BUILTIN = {"builtin:chars"}

# A directory without one of these has no tokenizer: AutoTokenizer would not fail there but
# silently build a BERT tokenizer with only the five special tokens.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")


def chars_tokenizer() -> BertTokenizer:
    """A WordPiece tokenizer over single characters (about 100 tokens), built in memory.

    Words split into a first letter or digit and ``##``-continuations, so any lowercase ASCII
    text tokenises without [UNK]; small enough for tiny test models.
    """
    pieces = [*string.ascii_lowercase, *string.digits]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *("##" + p for p in pieces),
              *".,;:!?'\"()-/&%$#@*+=<>[]_"]
    return BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})


def has_tokenizer(source: str) -> bool:
    """Whether ``source`` (a directory or hub id) ships a tokenizer; hub ids are assumed to."""
    return not is_local(source) or any((Path(source) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(value: str, base_dir: str, cache_dir: str = "") -> Any:
    """``builtin:chars``, or a tokenizer directory / hub id / ``package:NAME``."""
    if value.startswith(MEMORY_PREFIX):
        return memory_object(value)
    if value.startswith("builtin:"):
        if value not in BUILTIN:
            raise ModelError(f"unknown built-in tokenizer {value!r}; known: {', '.join(sorted(BUILTIN))}")
        return chars_tokenizer()
    source = resolve_source(value, base_dir, cache_dir)
    if not has_tokenizer(source):
        raise ModelError(f"no tokenizer files in {source} (looked for {', '.join(TOKENIZER_FILES)})")
    offline = hub_offline(source)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=offline is not None)
    except Exception as exc:  # any failure of a user-given source is bad input, not a crash
        if offline is not None:
            raise offline_problem("tokenizer", source, offline) from None
        raise ModelError(f"cannot load tokenizer {source!r}: {type(exc).__name__}: {exc}") from exc
