"""Generate docs/recipes.md and docs/hooks.md from the code, so that they cannot drift from it.

``python -m kdframe.docgen`` (from the repository root) writes both; ``--check`` only reports
which are stale (exit 1). tests/test_docs.py fails when they are.

recipes.md: every field of the attrs classes reachable from ``kdframe.recipe.Recipe`` (path,
type, default, allowed values, bounds from ``bounded``, the field's trailing ``#`` comment), then
every strategy of the bundled plugins with its params class. hooks.md: a section per hook in
``kdframe.hookspecs`` (signature, mode, docstring) with the when-called note and example from
``HOOK_NOTES`` below, which is where to edit them.
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
from kdframe.registry import SLOTS, Strategy

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
        parts += [f"{word} {limit:g}" for word, limit in zip(words, bounds, strict=True) if limit is not None]
    return ", ".join(parts)


def _field_comments(cls: type) -> dict[str, str]:
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


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""


def _table(rows: list[Row]) -> list[str]:
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    comments: dict[type, dict[str, str]] = {}
    for row in rows:
        note = comments.setdefault(row.owner, _field_comments(row.owner)).get(row.field.name, "")
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


def bundled_strategies() -> list[Strategy]:
    """The strategies of the plugins shipped with kdframe (installed third-party ones excluded,
    so that the docs do not depend on what is installed)."""
    host = load_plugins()
    bundled = {info.name for info in host.infos if info.source == "bundled"}
    return [s for s in host.registry.all() if s.plugin in bundled]


def strategy_param_path(strategy: Strategy, field: str) -> str:
    """Where a param is written in a recipe, e.g. ``stages[].losses.pred.temperature``."""
    table = f"losses.{strategy.name}" if strategy.slot == "loss" else strategy.slot
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
    lines += ["## Strategies", "",
              "Registered by the plugins bundled with kdframe. An installed third-party plugin documents its own;",
              "`kdframe plugins` lists what is installed.", ""]
    for strategy in sorted(bundled_strategies(), key=lambda s: (SLOTS.index(s.slot), s.name)):
        lines += _strategy_section(strategy)
    return "\n".join(lines).rstrip() + "\n"


# -- hooks.md ---------------------------------------------------------------------------------

@attrs.frozen
class HookNote:
    called: str  # when the engine or CLI calls the hook
    example: str  # an implementation, as a plugin module writes it


HOOK_NOTES: dict[str, HookNote] = {
    "kdframe_register_strategies": HookNote(
        "Once per command, right after every plugin is loaded (`kdframe run`, `validate`, `plugins`, ...).",
        '''\
@attrs.frozen
class SinkhornParams:
    reg: float = bounded(0.1, gt=0)

@hookimpl
def kdframe_register_strategies(registry):
    registry.add("mapping", "sinkhorn", params=SinkhornParams, description="entropic OT")
    registry.add("loss", "cos", needs=("hidden",), description="cosine of [CLS] vectors")'''),
    "kdframe_add_cli_options": HookNote(
        "While the `kdframe run` and `kdframe validate` parsers are built, before arguments are parsed.",
        '''\
@hookimpl
def kdframe_add_cli_options(parser):
    group = parser.add_argument_group("wandb plugin")
    group.add_argument("--wandb-project", help="log metrics to this W&B project")'''),
    "kdframe_validate_recipe": HookNote(
        "By `kdframe run`, `validate` and `export` (and each ablation cell) after the recipe is structured"
        " and its strategies resolved, before any model or data is loaded.",
        '''\
@hookimpl
def kdframe_validate_recipe(recipe, registry):
    return [f"stages[{i}].weighting: sinkhorn needs a weighting (uniform keeps the weights)"
            for i, stage in enumerate(recipe.stages)
            if stage.mapping and stage.mapping.strategy == "sinkhorn" and stage.weighting is None]'''),
    "kdframe_task_info": HookNote(
        "Once per command that loads a recipe, for `data.task`.",
        '''\
@hookimpl
def kdframe_task_info(name):
    if name != "sick":
        return None
    return TaskInfo("sick", 3, ("accuracy",), "accuracy", text_columns=("sentence_A", "sentence_B"))'''),
    "kdframe_task_names": HookNote(
        "Only when no plugin knows `data.task`, to list the known tasks in the error.",
        '''\
@hookimpl
def kdframe_task_names():
    return ["sick"]'''),
    "kdframe_load_data": HookNote(
        "After the models are loaded (tokenizer of the student), for `train`, then `dev`; not by"
        " `kdframe export`.",
        '''\
@hookimpl
def kdframe_load_data(data, task, split, tokenizer, cache_dir):
    if task.name != "sick":
        return None
    rows = read_sick(data.glue_dir, split)[: data.train_limit or None]
    encoded = tokenizer([r.a for r in rows], [r.b for r in rows], truncation=True, max_length=data.max_length)
    return TokenizedSplit(task, split, encoded["input_ids"], encoded["token_type_ids"], [r.label for r in rows])'''),
    "kdframe_data_fingerprint": HookNote(
        "When a run needs a fine-tuned teacher (before looking in the teacher cache), and when"
        " `kdframe ablate --jobs` plans which cells fine-tune a teacher.",
        '''\
@hookimpl
def kdframe_data_fingerprint(data):
    if data.task != "sick":
        return None
    files = [Path(data.glue_dir) / "SICK" / name for name in ("train.tsv", "dev.tsv")]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()'''),
    "kdframe_compute_metrics": HookNote(
        "After every dev evaluation: the teacher's, and each stage's at `eval_every` and at its end.",
        '''\
@hookimpl
def kdframe_compute_metrics(task, predictions, labels):
    if task.metrics != ("accuracy",):
        return None
    return {"accuracy": float((predictions == labels).mean())}'''),
    "kdframe_load_model": HookNote(
        "Once per command that loads a recipe: the teacher first, then the student (given the teacher).",
        '''\
@hookimpl
def kdframe_load_model(role, spec, task, teacher, base_dir):
    if not spec.model.startswith("onnx:"):
        return None  # the Hugging Face plugin handles the rest
    return load_onnx_model(spec.model.removeprefix("onnx:"), task, base_dir)'''),
    "kdframe_export_model": HookNote(
        "By `kdframe export RUN_DIR OUT`, with the run's final student.",
        '''\
@hookimpl
def kdframe_export_model(loaded, out_dir):
    if not isinstance(loaded.model, MyModel):
        return None
    loaded.model.save(out_dir)
    return f"MyModel with {loaded.num_layers} layers in {out_dir}"'''),
    "kdframe_extract_features": HookNote(
        "Every training step, teacher (under `no_grad`, in eval mode) then student; at every dev"
        " evaluation with empty `needs` (logits only); once per stage by `kdframe validate`.",
        '''\
@hookimpl
def kdframe_extract_features(role, model, batch, needs):
    if not isinstance(model, MyModel):
        return None
    out = model(batch["input_ids"], batch["attention_mask"], return_hidden="hidden" in needs)
    return Features(logits=out.logits, mask=batch["attention_mask"], hidden=out.hidden)'''),
    "kdframe_layer_costs": HookNote(
        "Every training step of a stage with a teacher, after both models' features; once per stage"
        " by `kdframe validate`.",
        '''\
@hookimpl
def kdframe_layer_costs(student, teacher, ctx):
    if not ctx.active("cos"):
        return {}
    s = F.normalize(torch.stack([h[:, 0] for h in student.hidden[1:]]), dim=-1)  # (M, B, d)
    t = F.normalize(torch.stack([h[:, 0] for h in teacher.hidden[1:]]), dim=-1)  # (N, B, d)
    return {"cos": 1 - torch.einsum("mbd,nbd->mn", s, t) / s.shape[1]}'''),
    "kdframe_layer_mapping": HookNote(
        "Every training step, once per cost kind, right after `kdframe_layer_costs`, with the kind's"
        " current layer weights (uniform at the start of a stage); once per kind by `kdframe validate`.",
        '''\
@hookimpl
def kdframe_layer_mapping(kind, cost, weights, ctx):
    if ctx.mapping is None or ctx.mapping.name != "sinkhorn":
        return None  # not ours: let the plugin that owns ctx.mapping answer
    return sinkhorn_flow(cost, *weights, ctx.mapping.params)'''),
    "kdframe_update_layer_weights": HookNote(
        "Every training step of a stage with a `weighting`, after the mappings; the weights it"
        " returns are used by the next step's mappings.",
        '''\
@hookimpl
def kdframe_update_layer_weights(flows, costs, weights, ctx):
    if ctx.weighting is None or ctx.weighting.name != "ema":
        return None
    rate = ctx.weighting.params.rate
    return {kind: ((1 - rate) * w_s + rate * flows[kind].sum(1), (1 - rate) * w_t + rate * flows[kind].sum(0))
            for kind, (w_s, w_t) in weights.items()}'''),
    "kdframe_loss_terms": HookNote(
        "Every training step after the mappings and the weighting; once per stage by `kdframe validate`"
        " (to check that every active term is computed by some plugin).",
        '''\
@hookimpl
def kdframe_loss_terms(student, teacher, costs, flows, batch, ctx):
    if not ctx.active("cos"):
        return {}
    return {"cos": (flows["cos"] * costs["cos"]).sum()}'''),
    "kdframe_extra_parameters": HookNote(
        "At the start of each stage, before `kdframe_stage_start`; the modules join the optimizer and"
        " the checkpoints.",
        '''\
@hookimpl
def kdframe_extra_parameters(ctx):
    if not ctx.active("cos"):
        return {}
    ctx.state["cos.proj"] = torch.nn.Linear(ctx.student_hidden_size, ctx.teacher_hidden_size)
    return {"cos.proj": ctx.state["cos.proj"]}  # read it back from ctx.state in your other hooks'''),
    "kdframe_run_start": HookNote(
        "Once per `kdframe run`, after the run directory is created and models and data are loaded,"
        " before the teacher is fine-tuned.",
        '''\
@hookimpl
def kdframe_run_start(run):
    run.progress.message(f"wandb: logging {run.session.recipe.name}")'''),
    "kdframe_stage_start": HookNote(
        "Before the first step of every stage (the teacher's fine-tuning too, with `ctx.stage_index =="
        " -1`), also when resuming one, and once per stage by `kdframe validate`. Raise"
        " `ModelError` here for layouts your strategy cannot handle: the user learns before training.",
        '''\
@hookimpl
def kdframe_stage_start(ctx):
    if ctx.mapping and ctx.mapping.name == "sinkhorn" and ctx.teacher_layers < 2:
        raise ModelError("mapping sinkhorn: the teacher needs at least 2 layers")'''),
    "kdframe_step_end": HookNote(
        "After every optimizer step (and every skipped non-finite step) of every stage, with the"
        " record (loss, lr, each term) also written to metrics.jsonl every `log_every` steps.",
        '''\
@hookimpl
def kdframe_step_end(ctx, record):
    if ctx.step % 100 == 0:
        wandb.log({f"{ctx.stage.name}/{k}": v for k, v in record.items()}, step=ctx.step)'''),
    "kdframe_eval_end": HookNote(
        "After each dev evaluation inside a stage (`eval_every`, end of epoch or stage).",
        '''\
@hookimpl
def kdframe_eval_end(ctx, metrics):
    wandb.log({f"{ctx.stage.name}/dev_{k}": v for k, v in metrics.items()}, step=ctx.step)'''),
    "kdframe_stage_end": HookNote(
        "After a stage's last step and its best-or-last model selection.",
        '''\
@hookimpl
def kdframe_stage_end(ctx):
    ctx.state.pop("cos.proj", None)  # the next stage builds its own'''),
    "kdframe_run_end": HookNote(
        "Once per successful `kdframe run`, after summary.json and student.pt are written.",
        '''\
@hookimpl
def kdframe_run_end(run, summary):
    wandb.summary.update(summary["student"]["best"])'''),
    "kdframe_on_exception": HookNote(
        "When `kdframe run` stops with any exception (a failed step, Ctrl-C) before the CLI prints"
        " the error and exits.",
        '''\
@hookimpl
def kdframe_on_exception(run, exc):
    wandb.finish(exit_code=1)'''),
    "kdframe_state_dict": HookNote(
        "Whenever a checkpoint is written: at evaluations, every `checkpoint_every` steps and on"
        " Ctrl-C. Check yours with `kdframe.testing.check_state_roundtrip`.",
        '''\
@hookimpl
def kdframe_state_dict(ctx):
    return {"ema.history": ctx.state.get("ema.history", torch.zeros(0))}  # prefix keys with your plugin'''),
    "kdframe_load_state_dict": HookNote(
        "On `kdframe run --resume`, when the interrupted stage restarts, after"
        " `kdframe_extra_parameters` and `kdframe_stage_start`.",
        '''\
@hookimpl
def kdframe_load_state_dict(ctx, state):
    if "ema.history" in state:
        ctx.state["ema.history"] = state["ema.history"]'''),
}

_HOOKS_HEAD = """\
# Hook reference

<!-- Generated by `python -m kdframe.docgen` from kdframe/hookspecs.py (signatures, modes,
docstrings) and HOOK_NOTES in kdframe/docgen.py (when called, examples). Do not edit by hand;
tests/test_docs.py fails when this file is stale. -->

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
    missing = sorted({f.__name__ for f in functions} ^ set(HOOK_NOTES))
    if missing:
        raise KeyError(f"HOOK_NOTES in kdframe/docgen.py and kdframe/hookspecs.py disagree on: {', '.join(missing)}")
    lines = [_HOOKS_HEAD, "| hook | mode |", "|---|---|"]
    lines += [f"| [`{f.__name__}`](#{f.__name__}) | {_mode(f)} |" for f in functions]
    for func in functions:
        note, doc = HOOK_NOTES[func.__name__], _doc(func)
        label = "A fuller example:" if "Example" in doc else "Example:"
        lines += ["", f"## {func.__name__}", "", "```python", _signature(func), "```", "",
                  f"**Mode:** {_mode(func)}. **Called:** {note.called}", "", doc, "",
                  label, "", "```python", note.example, "```"]
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
