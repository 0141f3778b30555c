"""Data passed between the engine and plugins through hooks.

torch is imported for annotations only: recipes, the registry and the CLI's parsers read these
classes without paying for torch's import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch

#: Feature names a strategy may declare in ``needs``.
FEATURES = ("logits", "hidden", "attn")

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
    """A tokenised split: parallel lists, one entry per example, unpadded.

    ``token_columns`` holds the other per-token model inputs by name (e.g. ``token_type_ids``),
    each as long as ``input_ids`` example by example; batches pad them with 0 like ``input_ids``
    and add the ``attention_mask``.
    """

    task: TaskInfo
    split: str
    input_ids: list[list[int]]
    labels: list[float] | list[int]
    token_columns: dict[str, list[list[int]]] = attrs.Factory(dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@attrs.define
class LoadedModel:
    """A model with its tokenizer and a one-line description of where it came from.

    ``features`` are those of ``FEATURES`` its loader can extract from it (a family whose
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
    features: frozenset[str] = frozenset(FEATURES)
    max_length: int | None = None  # the longest input in tokens it takes (position embeddings); None: no limit


@attrs.frozen
class Selected:
    """A strategy chosen by a recipe: its registered name and its structured params."""

    name: str
    params: Any
    weight: float = 1.0  # loss terms only


@attrs.define
class StageContext:
    """Everything a strategy hook may read about the stage being trained.

    ``mapping`` and ``weighting`` are the recipe's choices (or None), ``losses`` maps each active
    loss term (non-zero weight) to its choice. ``state`` is scratch space plugins may use during
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
    step: int = 0
    state: dict[str, Any] = attrs.Factory(dict)

    def active(self, term: str) -> bool:
        return term in self.losses
