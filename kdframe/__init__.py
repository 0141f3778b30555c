"""kdframe: plugin-based knowledge distillation for BERT-family models.

``kdframe.run`` runs a recipe from Python (kdframe.library); what plugin authors may import is
listed in ``kdframe.api``; everything else is private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Recipe", "RunResult", "run"]

if TYPE_CHECKING:
    from kdframe.library import RunResult, run
    from kdframe.recipe import Recipe

# Imported on first use: `kdframe --help` must not pay for torch and transformers.
def __getattr__(name: str) -> Any:
    if name in ("run", "RunResult"):
        from kdframe import library

        return getattr(library, name)
    if name == "Recipe":
        from kdframe.recipe import Recipe

        return Recipe
    raise AttributeError(f"module 'kdframe' has no attribute {name!r}")
