"""A JSON Schema of recipes (``kdframe schema``), for editors that complete and check TOML.

Built from the same attrs classes that structure a recipe, with the loaded plugins' names and
params: every strategy of a slot (a name, or a table with ``strategy`` and that strategy's
params), every loss term, every data source's ``[data]`` keys. Types, defaults, bounds from
``bounded``, Literal choices, and each field's trailing ``#`` comment as its description. The
schema accepts what ``kdframe validate`` accepts key by key; checks across keys (a mapping that
does not fit the layer counts) remain validate's.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any, Literal

import attrs

from kdframe.recipe import DataSpec, LossChoice, Recipe, Stage, StrategyChoice, converter
from kdframe.registry import Registry

DIALECT = "https://json-schema.org/draft/2020-12/schema"
_SCALARS = {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}, bool: {"type": "boolean"},
            Any: {}}


def field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# ...`` comments of a class's field lines: the fields' one-line documentation."""
    comments = {}
    for klass in reversed(cls.__mro__):  # subclasses override their bases' comments
        if not attrs.has(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
            if match:
                comments[match.group(1)] = match.group(2).strip()
    return comments


def recipe_schema(registry: Registry) -> dict[str, Any]:
    """The JSON Schema of a recipe with the strategies and sources in ``registry``."""
    schema = _Builder(registry).object(Recipe)
    # A recipe that extends another one leaves out what its base gives (data, models, stages):
    # required keys are kdframe validate's to check, on the merged recipe.
    schema.pop("required", None)
    schema["properties"]["extends"] = {"type": "string", "description": "a recipe this one is layered on"
                                       " (a path relative to this recipe)"}
    return {"$schema": DIALECT, "title": "kdframe recipe", **schema}


def params_schema(params: type) -> dict[str, Any]:
    """The JSON Schema of a strategy's or source's params class (``kdframe plugins --json``)."""
    return _Builder(None).object(params)


class _Builder:
    def __init__(self, registry: Registry | None) -> None:
        self.registry = registry

    def object(self, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        properties, required = {}, []
        for field in attrs.fields(cls):
            if field.name in skip or field.metadata.get("source_params"):
                continue
            prop = self.field(cls, field, hints[field.name])
            if comments.get(field.name):
                prop["description"] = comments[field.name]
            properties[field.name] = prop
            if field.default is attrs.NOTHING:
                required.append(field.name)
        schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        if required:
            schema["required"] = required
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):  # attrs' generated docstring
            schema["description"] = inspect.cleandoc(cls.__doc__).split("\n\n")[0].replace("\n", " ")
        return schema

    def field(self, owner: type, field: attrs.Attribute, tp: Any) -> dict[str, Any]:
        if owner is DataSpec and field.name == "params":
            return {}
        if tp in (StrategyChoice, StrategyChoice | None):
            return self.choice(field.name)
        if field.name == "losses" and typing.get_args(tp)[1:] == (LossChoice,):
            return self.losses()
        if owner is Stage and field.name == "controls":
            return self.controls()
        prop = self.type(tp)
        bounds = field.metadata.get("bounds")
        if bounds is not None:
            for key, limit in zip(("exclusiveMinimum", "minimum", "maximum", "exclusiveMaximum"), bounds, strict=True):
                if limit is not None:
                    prop[key] = limit
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        if default is not attrs.NOTHING and default is not None:
            prop["default"] = converter.unstructure(default)
        return prop

    def type(self, tp: Any) -> dict[str, Any]:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp in _SCALARS:
            return dict(_SCALARS[tp])
        if origin is Literal:
            return {"enum": list(args)}
        if origin in (typing.Union, type(int | None)):
            inner = [a for a in args if a is not type(None)]
            return self.type(inner[0]) if len(inner) == 1 else {"anyOf": [self.type(a) for a in inner]}
        if origin is list:
            return {"type": "array", "items": self.type(args[0]) if args else {}}
        if origin is dict:
            return {"type": "object", "additionalProperties": self.type(args[1]) if len(args) == 2 else {}}
        if attrs.has(tp):
            return self.data() if tp is DataSpec else self.object(tp)
        return {}

    def strategies(self, slot: str) -> list[Any]:
        if self.registry is None:
            return []
        return sorted((s for s in self.registry.all() if s.slot == slot), key=lambda s: s.name)

    def choice(self, slot: str) -> dict[str, Any]:
        """A mapping or weighting: a strategy's name, or a table with ``strategy`` and its params."""
        known = self.strategies(slot)
        tables = []
        for strategy in known:
            table = self.object(strategy.params)
            table["properties"] = {"strategy": {"const": strategy.name}, **table["properties"]}
            table["required"] = ["strategy", *table.get("required", [])]
            table["description"] = strategy.description or table.get("description", "")
            tables.append(table)
        return {"anyOf": [{"enum": [s.name for s in known]}, *tables],
                "description": f"a {slot} strategy: its name, or a table with strategy = NAME and its params"}

    def losses(self) -> dict[str, Any]:
        """Loss terms by name: a weight, or a table with ``weight`` and the term's params."""
        properties = {}
        for strategy in self.strategies("loss"):
            table = self.object(strategy.params)
            table["properties"] = {"weight": {"type": "number", "minimum": 0}, **table["properties"]}
            table["required"] = ["weight", *table.get("required", [])]
            properties[strategy.name] = {"anyOf": [{"type": "number", "minimum": 0}, table],
                                         "description": strategy.description}
        return {"type": "object", "properties": properties, "additionalProperties": False,
                "description": "loss terms: NAME = weight, or a table with weight and the term's params"}

    def controls(self) -> dict[str, Any]:
        """Controls by name, each a table of its params."""
        properties = {s.name: {**self.object(s.params), "description": s.description} for s in self.strategies("control")}
        return {"type": "object", "properties": properties, "additionalProperties": False,
                "description": "controls that may end the stage early: NAME = { params }"}

    def data(self) -> dict[str, Any]:
        """``[data]``: the core keys beside one data source's own keys, for each source."""
        core = self.object(DataSpec)
        sources = self.registry.data_sources() if self.registry else []
        variants = []
        for source in sorted(sources, key=lambda s: s.name):
            own = self.object(source.params)
            properties = {**core["properties"], **own["properties"]}
            properties["source"] = {**properties["source"], "enum": ["", source.name]}
            tasks = sorted(t.name for t in self.registry.tasks() if t.source == source.name)
            if source.task is None and tasks:
                properties["task"] = {**properties["task"], "enum": tasks}
            variants.append({"type": "object", "properties": properties, "additionalProperties": False,
                             "description": f"data source {source.name}: {source.description}"})
        return {"anyOf": variants} if variants else core
