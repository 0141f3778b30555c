"""Named strategies per slot, each with an attrs params class, registered by plugins."""

from __future__ import annotations

from typing import Iterable

import attrs

from kdframe.errors import PluginError, RecipeError
from kdframe.types import FEATURES

SLOTS = ("mapping", "weighting", "loss")


@attrs.frozen
class NoParams:
    """Params class of a strategy that takes none."""


@attrs.frozen
class Strategy:
    """A registered strategy.

    ``needs`` names the features (``kdframe.types.FEATURES``) it reads from both models;
    ``keeps_marginals`` says whether a mapping's flow has the layer weights as marginals;
    ``student_only`` marks a loss term that needs no teacher at all (hard labels).
    """

    slot: str
    name: str
    params: type
    plugin: str
    needs: frozenset[str] = frozenset()
    description: str = ""
    keeps_marginals: bool = True
    student_only: bool = False


class StrategyRegistry:
    def __init__(self) -> None:
        self._by_slot: dict[str, dict[str, Strategy]] = {slot: {} for slot in SLOTS}
        self.current_plugin = "?"

    def add(
        self,
        slot: str,
        name: str,
        params: type = NoParams,
        *,
        needs: Iterable[str] = (),
        description: str = "",
        keeps_marginals: bool = True,
        student_only: bool = False,
    ) -> Strategy:
        if slot not in self._by_slot:
            raise PluginError(
                f"plugin {self.current_plugin!r} registers {name!r} in unknown slot {slot!r};"
                f" slots are: {', '.join(SLOTS)}"
            )
        taken = self._by_slot[slot].get(name)
        if taken is not None:
            raise PluginError(
                f"plugin {self.current_plugin!r} registers {slot} strategy {name!r},"
                f" which plugin {taken.plugin!r} already registered"
            )
        if not attrs.has(params):
            raise PluginError(
                f"plugin {self.current_plugin!r}: params of {slot} strategy {name!r} must be an"
                f" attrs class, got {params!r}"
            )
        unknown = set(needs) - set(FEATURES)
        if unknown:
            raise PluginError(
                f"plugin {self.current_plugin!r}: {slot} strategy {name!r} needs unknown"
                f" features {sorted(unknown)}; known: {', '.join(FEATURES)}"
            )
        strategy = Strategy(
            slot=slot,
            name=name,
            params=params,
            plugin=self.current_plugin,
            needs=frozenset(needs),
            description=description,
            keeps_marginals=keeps_marginals,
            student_only=student_only,
        )
        self._by_slot[slot][name] = strategy
        return strategy

    def get(self, slot: str, name: str, path: str = "") -> Strategy:
        try:
            return self._by_slot[slot][name]
        except KeyError:
            known = ", ".join(sorted(self._by_slot.get(slot, {}))) or "(none)"
            where = f"{path}: " if path else ""
            raise RecipeError([f"{where}unknown {slot} strategy {name!r}; known: {known}"]) from None

    def names(self, slot: str) -> list[str]:
        return sorted(self._by_slot[slot])

    def all(self) -> list[Strategy]:
        return [s for slot in SLOTS for s in self._by_slot[slot].values()]

    def by_plugin(self, plugin: str) -> list[Strategy]:
        return [s for s in self.all() if s.plugin == plugin]
