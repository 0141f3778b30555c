"""Data passed between the engine and plugins through hooks.

torch is imported for annotations only: recipes, the registry and the CLI's parsers read these
classes without paying for torch's import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import torch

#: What a feature hook extracts from a model (``LoadedModel.features`` is a subset of these).
EXTRACTABLE = ("logits", "hidden", "attn")
#: Feature names a strategy may declare in ``needs``. ``cls`` is the hidden states at the first
#: position only (BERT's [CLS] vectors): a strategy that reads nothing else declares it, and the
#: teacher-feature cache then stores one vector per layer instead of the whole sequence.
FEATURES = (*EXTRACTABLE, "cls")


def extracted(needs: frozenset[str]) -> frozenset[str]:
    """The features a model is run for to give ``needs``: ``cls`` comes from the hidden states."""
    return (needs - {"cls"}) | ({"hidden"} if "cls" in needs else frozenset())


def as_needed(features: Features, needs: frozenset[str]) -> Features:
    """``features`` as a stage that reads ``needs`` gets them: with ``cls`` but not ``hidden``, each
    hidden state narrowed to its first position (B, 1, d), as the teacher-feature cache stores it,
    so a strategy that reads past [CLS] fails whether or not the cache serves the teacher."""
    if "cls" not in needs or "hidden" in needs or features.hidden is None:
        return features
    return attrs.evolve(features, hidden=tuple(h[:, :1] for h in features.hidden))

#: Layer weights per cost kind: (student weights (M,), teacher weights (N,)), each on the simplex.
LayerWeights = dict[str, "tuple[torch.Tensor, torch.Tensor]"]


@attrs.define
class Features:
    """What one forward pass of a model exposes to distillation strategies.

    ``hidden`` has one entry per layer plus the embedding output at index 0, each (B, L, d).
    ``attn`` has one entry per layer, each the pre-softmax scores (B, heads, L, L) with every
    masked (padded) key entry set to 0. Features a recipe does not need are ``None``.
    """

    logits: torch.Tensor | None
    mask: torch.Tensor
    hidden: tuple[torch.Tensor, ...] | None = None
    attn: tuple[torch.Tensor, ...] | None = None

    @property
    def num_layers(self) -> int:
        if self.hidden is not None:
            return len(self.hidden) - 1
        if self.attn is not None:
            return len(self.attn)
        raise ValueError("no layer features captured")


@attrs.frozen
class TaskInfo:
    """A task a data plugin knows: label set, metrics, and which metric picks the best model."""

    name: str
    num_labels: int  # 1 for regression
    metrics: tuple[str, ...]
    main_metric: str
    text_columns: tuple[str, ...] = ("sentence",)
    labels: tuple[str, ...] = ()  # label values as they appear in the data, in id order
    label_names: tuple[str, ...] = ()  # what each label means, in id order (exported models show these)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def names(self) -> tuple[str, ...]:
        """A readable name per class id: ``label_names``, else the labels as in the data."""
        return self.label_names or self.labels


@attrs.define
class TokenizedSplit:
    """A tokenised split: an Arrow table with one row per example, unpadded.

    Columns: ``input_ids`` (a list of token ids per example), ``labels`` (a class id, or a score
    for regression) and any other per-token model inputs by name (e.g. ``token_type_ids``), each
    as long as ``input_ids`` row by row; batches pad them with 0 like ``input_ids`` and add the
    ``attention_mask``. The table is usually memory-mapped from a cache file
    (``kdframe.api.tokenize_to_arrow``), so a split costs memory only for the batches read from
    it; ``from_lists`` builds one in memory.
    """

    task: TaskInfo
    split: str
    table: pa.Table
    source: str = ""
    _lengths: Any = attrs.field(default=None, init=False, repr=False, eq=False)

    @classmethod
    def from_lists(cls, task: TaskInfo, split: str, input_ids: list[list[int]], labels: list[int] | list[float],
                   token_columns: dict[str, list[list[int]]] | None = None, source: str = "") -> TokenizedSplit:
        """A split held in memory, from parallel lists (one entry per example)."""
        import pyarrow as pa

        ids = pa.list_(pa.int32())
        columns = {"input_ids": pa.array(input_ids, ids),
                   **{name: pa.array(values, ids) for name, values in (token_columns or {}).items()},
                   "labels": pa.array(labels, pa.float64() if task.is_regression else pa.int64())}
        return cls(task, split, pa.table(columns), source)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def token_columns(self) -> list[str]:
        """The per-token columns, ``input_ids`` first."""
        return ["input_ids", *(name for name in self.table.column_names if name not in ("input_ids", "labels"))]

    def lengths(self) -> np.ndarray:
        """Tokens per example (computed once)."""
        if self._lengths is None:
            import numpy as np
            import pyarrow.compute as pc

            self._lengths = pc.list_value_length(self.table.column("input_ids")).to_numpy().astype(np.int64)
        return self._lengths

    def labels(self) -> np.ndarray:
        """Every label, in order: class ids (int64), or scores (float32, as batches hold them)."""
        import numpy as np

        column = self.table.column("labels").to_numpy()
        return column.astype(np.float32) if self.task.is_regression else column.astype(np.int64)


@attrs.define
class LoadedModel:
    """A model with its tokenizer and a one-line description of where it came from.

    ``features`` are those of ``EXTRACTABLE`` its loader can extract from it (a family whose
    attention scores cannot be captured gives logits and hidden states only); a recipe whose
    stages read more is refused before training, naming the terms.
    """

    model: torch.nn.Module
    tokenizer: Any
    description: str
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    features: frozenset[str] = frozenset(EXTRACTABLE)
    max_length: int | None = None  # the longest input in tokens it takes (position embeddings); None: no limit
    # What a model card says of it, as its loader knows: license, base_model (a hub id), library_name.
    card: dict[str, str] = attrs.Factory(dict)
    # The task head's output layer when the loader initialised it anew (no trained head came with
    # the weights); None for a trained head. On regression tasks its bias is set from the labels.
    fresh_head: torch.nn.Linear | None = None


@attrs.frozen
class Selected:
    """A strategy chosen by a recipe: its registered name and its structured params."""

    name: str
    params: Any
    weight: float = 1.0  # loss terms only


@attrs.frozen
class Control:
    """What an event hook (``kdframe_step_end``, ``kdframe_eval_end``) may ask of the engine after
    the step: ``stop`` the stage (it ends as if its steps had run out: the best model is selected,
    the next stage starts), ``evaluate`` on the dev set now, ``save`` a checkpoint now. ``reason``
    says why, in logs and in the stage's summary. Requests of several plugins add up."""

    stop: bool = False
    evaluate: bool = False
    save: bool = False
    reason: str = ""

    def __or__(self, other: Control) -> Control:
        reason = "; ".join(r for r in (self.reason, other.reason) if r)
        return Control(self.stop or other.stop, self.evaluate or other.evaluate, self.save or other.save, reason)


@attrs.define
class StageContext:
    """Everything a strategy hook may read about the stage being trained.

    ``mapping`` and ``weighting`` are the recipe's choices (or None), ``losses`` maps each active
    loss term (non-zero weight) to its choice, ``controls`` each control the stage names to its
    choice. ``state`` is scratch space plugins may use during
    the stage; what must survive a resume goes through the state_dict hooks.
    """

    run_dir: Any
    stage_index: int
    stage: Any
    task: TaskInfo
    student_layers: int
    teacher_layers: int
    student_hidden_size: int
    teacher_hidden_size: int
    student_heads: int
    teacher_heads: int
    mapping: Selected | None
    weighting: Selected | None
    losses: dict[str, Selected]
    device: torch.device
    controls: dict[str, Selected] = attrs.Factory(dict)
    # The mapping's flows leave most pairs at zero (Strategy.sparse_flow): a costs plugin may compute
    # the cost grid without autograd and the loss through the pairs that carry flow only.
    sparse_flow: bool = False
    step: int = 0
    state: dict[str, Any] = attrs.Factory(dict)

    def active(self, term: str) -> bool:
        return term in self.losses
