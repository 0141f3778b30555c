"""Layer weightings (docs/method.md section 4): ``cost-attention`` moves weight to layers that transfer
cheaply, gradient-free, after every solve; ``uniform`` keeps the weights as they are."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

import attrs

from kdframe.api import KdframeWarning, LayerWeights, Registry, StageContext, bounded, hookimpl

if TYPE_CHECKING:
    import torch


@attrs.frozen
class CostAttentionParams:
    """``normalize = "sum"``: the current reference code; ``"softmax"``: the paper-era code with
    ``temperature`` (T_emd) and a second plain softmax after averaging. ``separate = true`` keeps
    one set of weights per cost kind instead of feeding their average to every kind. ``eps``
    floors the cost ratios and the weights so that a zero cost cannot produce 0/0.
    ``single_kind = "half-step"``: with one cost kind (the no-attention / no-hidden ablations),
    average its update with the uniform weights of the kind that is off, as the reference code
    does (it keeps both kinds' weights and never updates the disabled one); ``"own"`` uses the one
    kind's update alone."""

    normalize: Literal["sum", "softmax"] = "sum"  # scores to weights: divide by their sum, or softmax(score / T)
    temperature: float = bounded(1.0, gt=0)  # T_emd of the softmax (no effect with "sum")
    separate: bool = False  # one set of weights per cost kind, instead of their average
    eps: float = bounded(1e-8, gt=0)  # floor of cost ratios and weights (no 0/0)
    single_kind: Literal["own", "half-step"] = "own"  # one cost kind: its update, or half-way to uniform (reference)


@hookimpl
def kdframe_register(registry: Registry) -> None:
    registry.add("weighting", "cost-attention", params=CostAttentionParams, needs_marginals=True,
                 description="reweight layers by transported cost per unit of weight (BERT-EMD)")
    registry.add("weighting", "uniform", description="keep the layer weights as they are (uniform)")


@hookimpl
def kdframe_validate_recipe(recipe: Any, registry: Registry) -> list[str]:
    for i, stage in enumerate(recipe.stages):
        chosen = stage.weighting
        if chosen and chosen.strategy == "cost-attention" and "temperature" in chosen.params \
                and chosen.params.get("normalize", "sum") == "sum":
            warnings.warn(f"stages[{i}].weighting.temperature has no effect with normalize = \"sum\" (it is the"
                          " softmax's T_emd): drop it, or set normalize = \"softmax\"", KdframeWarning, stacklevel=1)
    return []


@hookimpl
def kdframe_update_layer_weights(
    flows: dict[str, torch.Tensor], costs: dict[str, torch.Tensor], weights: LayerWeights, ctx: StageContext
) -> LayerWeights | None:
    name = ctx.weighting.name if ctx.weighting else None
    if name == "cost-attention":
        from kdframe_cost_attention.update import cost_attention  # torch: only once a stage trains

        return cost_attention(flows, costs, weights, ctx.weighting.params)
    if name == "uniform":
        return dict(weights)
    return None
