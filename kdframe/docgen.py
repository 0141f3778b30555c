"""Generate docs/recipes.md and docs/hooks.md from the code, so that they cannot drift from it.

``python -m kdframe.docgen`` (from the repository root) writes both; ``--check`` only reports
which are stale (exit 1). tests/test_docs.py fails when they are.

recipes.md: every field of the attrs classes reachable from ``kdframe.recipe.Recipe`` (path,
type, default, allowed values, bounds from ``bounded``, the field's trailing ``#`` comment), then
the bundled plugins' data sources (their ``[data]`` keys and tasks), model sources and strategies
with their params classes. hooks.md: a section per hook in ``kdframe.hookspecs``: signature, mode,
and the docstring's description, ``Called:`` paragraph and ``Example::`` block (edit them there).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import attrs

from kdframe import hookspecs
from kdframe.plugins import load_plugins
from kdframe.recipe import Recipe, converter
from kdframe.registry import SLOTS, DataSource, Registry, Strategy
from kdframe.schema import field_comments

# -- recipes.md -------------------------------------------------------------------------------

_TOML_TYPES = {int: "integer", float: "float", str: "string", bool: "boolean", Any: "any"}


@attrs.frozen
class Row:
    path: str  # e.g. "stages[].lr"; list items are "[]", table keys chosen by the user "<name>"
    field: attrs.Attribute
    type: Any
    owner: type


def _nested(tp: Any) -> tuple[type, str] | None:
    """The attrs class inside a field's type and the path step to reach it, if any."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if attrs.has(tp):
        return tp, ""
    if origin is list and args and attrs.has(args[0]):
        return args[0], "[]"
    if origin is dict and len(args) == 2 and attrs.has(args[1]):
        return args[1], ".<name>"
    if origin in (typing.Union, type(int | None)):
        inner = [a for a in args if a is not type(None)]
        return _nested(inner[0]) if len(inner) == 1 else None
    return None


def walk(cls: type, prefix: str = "") -> Iterator[Row]:
    """Every field reachable from ``cls``, depth first, with its path."""
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        if field.metadata.get("source_params"):
            continue  # the data source's own keys: documented per source
        tp = hints[field.name]
        path = prefix + field.name
        yield Row(path, field, tp, cls)
        nested = _nested(tp)
        if nested is not None:
            yield from walk(nested[0], f"{path}{nested[1]}.")


def _type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return _type_text(type(args[0]))
    if origin in (typing.Union, type(int | None)):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_text(a) for a in inner) + (" (optional)" if len(inner) < len(args) else "")
    if origin is list:
        if args and attrs.has(args[0]):
            return "array of tables"
        return f"array of {_type_text(args[0]) if args else 'any'}s"
    if origin is dict or attrs.has(tp):
        return "table"
    return _TOML_TYPES.get(tp, getattr(tp, "__name__", str(tp)))


def _toml(value: Any) -> str:
    """A plain value in TOML's inline syntax."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }" if value else "{}"
    return repr(value)


def _default_text(field: attrs.Attribute) -> str:
    default = field.default
    if default is attrs.NOTHING:
        return "required"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    if default is None:
        return "(none)"
    return f"`{_toml(converter.unstructure(default))}`"


def _allowed_text(row: Row) -> str:
    parts = []
    if typing.get_origin(row.type) is Literal:
        parts.append(", ".join(f"`{_toml(v)}`" for v in typing.get_args(row.type)))
    bounds = row.field.metadata.get("bounds")
    if bounds is not None:
        words = (">", ">=", "<=", "<")  # the order of bounded()'s (gt, ge, le, lt)
        parts += [f"{word} {limit if isinstance(limit, int) else f'{limit:g}'}"
                  for word, limit in zip(words, bounds, strict=True) if limit is not None]
    return ", ".join(parts)


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""


def _table(rows: list[Row]) -> list[str]:
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    comments: dict[type, dict[str, str]] = {}
    for row in rows:
        note = comments.setdefault(row.owner, field_comments(row.owner)).get(row.field.name, "")
        cells = [f"`{row.path}`", _type_text(row.type), _default_text(row.field), _allowed_text(row), note]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return lines


def _table_title(path: str) -> str:
    if not path:
        return "Top level"
    return f"`[[{path[:-2]}]]`" if path.endswith("[]") else f"`[{path}]`"


_RECIPES_HEAD = """\
# Recipe reference

<!-- Generated by `python -m kdframe.docgen` from kdframe/recipe.py and the bundled plugins'
strategy params classes. Do not edit by hand: edit the classes (docstrings, trailing field
comments) and run the generator; tests/test_docs.py fails when this file is stale. -->

A recipe is a TOML file structured into the classes below; an unknown key, a wrong type or a value
out of range is an error naming its path, and every problem is reported at once
(`kdframe validate RECIPE`). Paths here write `[]` for "any entry of the list" (in `--set`, give
the index: `stages[0].lr`) and `<name>` for a key you choose (a loss term's name).

Two keys are not fields: `extends = "base.toml"` (top level; a path relative to this recipe) layers
the recipe on another one, tables merging key by key and any other value, lists included,
replacing the base's; relative paths in the base stay relative to the base. And a strategy table's
keys other than `strategy` (or a loss term's other than `weight`) are the strategy's params,
documented under [Strategies](#strategies); the short forms `mapping = "emd"` and `hid = 0.01`
take every param's default.

See [guide.md](guide.md) for how recipes are used.
"""


def bundled() -> tuple[Registry, set[str]]:
    """The registry and the names of the plugins shipped with kdframe: the docs list what these
    register (installed third-party plugins excluded, so the docs do not depend on what is installed)."""
    host = load_plugins()
    return host.registry, {info.name for info in host.infos if info.source == "bundled"}


def bundled_strategies() -> list[Strategy]:
    registry, plugins = bundled()
    return [s for s in registry.all() if s.plugin in plugins]


def _data_source_section(source: DataSource, registry: Registry) -> list[str]:
    lines = [f"### data source `{source.name}`", ""]
    if source.description:
        lines += [source.description[0].upper() + source.description[1:] + ".", ""]
    tasks = ", ".join(f"`{t.name}`" for t in registry.tasks() if t.source == source.name)
    if source.task is not None:
        lines += [f"Plugin `{source.plugin}`. Recipes define their own task with the keys below;"
                  " `data.task` names it (any plain name).", ""]
    else:
        lines += [f"Plugin `{source.plugin}`; tasks: {tasks or '(none registered)'}.", ""]
    if not attrs.fields(source.params):
        return lines + ["No keys of its own.", ""]
    if source.params.__doc__:
        lines += [_doc(source.params), ""]
    hints = typing.get_type_hints(source.params)
    rows = [Row(f"data.{f.name}", f, hints[f.name], source.params) for f in attrs.fields(source.params)]
    return lines + _table(rows) + [""]


def strategy_param_path(strategy: Strategy, field: str) -> str:
    """Where a param is written in a recipe, e.g. ``stages[].losses.pred.temperature``."""
    table = {"loss": f"losses.{strategy.name}", "control": f"controls.{strategy.name}"}.get(strategy.slot, strategy.slot)
    return f"stages[].{table}.{field}"


def _strategy_section(strategy: Strategy) -> list[str]:
    lines = [f"### {strategy.slot} `{strategy.name}`", ""]
    if strategy.description:
        lines += [strategy.description[0].upper() + strategy.description[1:] + ".", ""]
    facts = [f"Plugin `{strategy.plugin}`"]
    if strategy.needs:
        facts.append("reads " + ", ".join(f"`{n}`" for n in sorted(strategy.needs)))
    if strategy.slot == "mapping":
        facts.append(("keeps" if strategy.keeps_marginals else "does not keep") + " the layer weights as marginals")
        if strategy.fixed:
            facts.append("a fixed flow (it reads neither costs nor weights)")
    if strategy.needs_marginals:
        facts.append("needs a mapping that keeps the layer weights as marginals, or a fixed one")
    if strategy.student_only:
        facts.append("needs no teacher")
    lines += ["; ".join(facts) + ".", ""]
    if not attrs.fields(strategy.params):
        return lines + ["No params.", ""]
    if strategy.params.__doc__:
        lines += [_doc(strategy.params), ""]
    hints = typing.get_type_hints(strategy.params)
    rows = [Row(strategy_param_path(strategy, f.name), f, hints[f.name], strategy.params)
            for f in attrs.fields(strategy.params)]
    return lines + _table(rows) + [""]


def _depth(path: str) -> int:
    return path.count(".") + 1 if path else 0


def render_recipes() -> str:
    rows = list(walk(Recipe))
    tables: dict[str, tuple[type, list[Row]]] = {"": (Recipe, [])}  # table path -> class, its rows
    for row in rows:
        nested = _nested(row.type)
        if nested is not None:
            tables[row.path + nested[1]] = (nested[0], [])
    for row in rows:
        tables[row.path.rpartition(".")[0]][1].append(row)
    # A class used at several places (a Stage in [[stages]] and [teacher.train]) gets its full
    # table at the shallowest one; the others list their paths and point there.
    primary: dict[type, str] = {}
    for path, (cls, _) in sorted(tables.items(), key=lambda item: _depth(item[0])):
        primary.setdefault(cls, path)
    lines = [_RECIPES_HEAD]
    repeated: list[str] = []
    for path, (cls, table_rows) in tables.items():
        if any(path.startswith(done + ".") for done in repeated):
            continue  # listed with the repeated table that holds it
        lines += [f"## {_table_title(path)}", ""]
        if primary[cls] != path:
            repeated.append(path)
            under = ", ".join(f"`{row.path}`" for row in rows if row.path.startswith(path + "."))
            lines += [f"The keys of {_table_title(primary[cls])}, with the same types, defaults and bounds:"
                      f" {under}.", ""]
            continue
        if _doc(cls):
            lines += [_doc(cls), ""]
        lines += _table(table_rows) + [""]
    registry, plugins = bundled()
    defining = ", ".join(f"`{s.name}`" for s in registry.data_sources() if s.task and s.plugin in plugins)
    lines += ["## Data sources", "",
              "`data.task` picks a registered task, and with it the data source that reads it; or `data.source`"
              f" names a source that defines tasks ({defining}) and the recipe describes its own task in that"
              " source's keys.",
              "A source's own keys sit in `[data]` beside the ones above. Registered by the bundled plugins;",
              "`kdframe plugins` lists what is installed.", ""]
    for source in registry.data_sources():
        if source.plugin in plugins:
            lines += _data_source_section(source, registry)
    lines += ["## Model sources", "",
              "`teacher.model`, `student.model` and the `tokenizer` keys take a directory, a hub id, or `NAME:...`",
              "with one of these registered names:", ""]
    lines += [f"- `{m.name}:` ({m.plugin}): {m.description}" for m in registry.model_sources() if m.plugin in plugins]
    lines += ["", "## Strategies", "",
              "Registered by the plugins bundled with kdframe. An installed third-party plugin documents its own;",
              "`kdframe plugins` lists what is installed.", ""]
    for strategy in sorted(bundled_strategies(), key=lambda s: (SLOTS.index(s.slot), s.name)):
        lines += _strategy_section(strategy)
    return "\n".join(lines).rstrip() + "\n"


# -- hooks.md ---------------------------------------------------------------------------------

@attrs.frozen
class HookDoc:
    """A hookspec's docstring in its three parts."""

    text: str  # what the hook does
    called: str  # when the engine or the CLI calls it
    example: str  # an implementation, as a plugin module writes it

    @classmethod
    def of(cls, func: Any) -> HookDoc:
        doc = _doc(func)
        text, marker, example = doc.partition("\n\nExample::\n\n")
        paragraphs = text.split("\n\n")
        called = [p for p in paragraphs if p.startswith("Called:")]
        if not marker or len(called) != 1:
            raise ValueError(f"{func.__name__}'s docstring needs one 'Called:' paragraph and an 'Example::' block")
        text = "\n\n".join(p for p in paragraphs if not p.startswith("Called:"))
        return cls(text, " ".join(called[0].removeprefix("Called:").split()), inspect.cleandoc(example))


_HOOKS_HEAD = """\
# Hook reference

<!-- Generated by `python -m kdframe.docgen` from kdframe/hookspecs.py (signatures, modes,
docstrings with their Called: paragraph and example). Do not edit by hand; tests/test_docs.py
fails when this file is stale. -->

A plugin is a module (or object) with functions named after these hooks and marked with
`kdframe.api.hookimpl`; it implements only the hooks it needs, each taking any subset of the
hook's arguments by name. **firstresult** hooks stop at the first plugin that returns something
other than None, so a plugin answers only for what it owns (its strategy name, its model class);
the other hooks **collect** every plugin's answer. `KDFRAME_TRACE_HOOKS=1` prints every hook call.
[lifecycle.md](lifecycle.md) shows the order in which the engine calls them;
[writing-plugins.md](writing-plugins.md) walks through a complete plugin.

"""


def hook_functions() -> list[Any]:
    """The hook specifications, in the order kdframe/hookspecs.py defines them."""
    return [f for name, f in vars(hookspecs).items() if name.startswith("kdframe_") and hasattr(f, "kdframe_spec")]


def _signature(func: Any) -> str:
    """``def name(arg: type, ...) -> type`` with the annotations as written (they are strings)."""
    sig = inspect.signature(func)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    line = f"def {func.__name__}({params}) -> {sig.return_annotation}"
    if len(line) <= 100:
        return line
    return f"def {func.__name__}(\n" + "".join(f"    {p.name}: {p.annotation},\n" for p in sig.parameters.values()) \
        + f") -> {sig.return_annotation}"


def _mode(func: Any) -> str:
    return "firstresult" if func.kdframe_spec["firstresult"] else "collects every answer"


def render_hooks() -> str:
    functions = hook_functions()
    lines = [_HOOKS_HEAD, "| hook | mode |", "|---|---|"]
    lines += [f"| [`{f.__name__}`](#{f.__name__}) | {_mode(f)} |" for f in functions]
    for func in functions:
        doc = HookDoc.of(func)
        lines += ["", f"## {func.__name__}", "", "```python", _signature(func), "```", "",
                  f"**Mode:** {_mode(func)}. **Called:** {doc.called}", "", doc.text, "",
                  "Example:", "", "```python", doc.example, "```"]
    return "\n".join(lines).rstrip() + "\n"


# -- the command ------------------------------------------------------------------------------

GENERATED = {"recipes.md": render_recipes, "hooks.md": render_hooks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdframe.docgen", description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="docs", help="the docs directory (default: ./docs)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, render in GENERATED.items():
        path = Path(args.docs) / name
        text = render()
        if path.exists() and path.read_text() == text:
            continue
        stale.append(str(path))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if not stale:
        print("docs are up to date")
        return 0
    if args.check:
        print(f"stale: {', '.join(stale)}; run python -m kdframe.docgen", file=sys.stderr)
        return 1
    print(f"written: {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
