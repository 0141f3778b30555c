"""Recipes: TOML structured into frozen attrs classes by cattrs, unknown keys rejected.

Problems are collected, not raised one by one: type errors and unknown keys from cattrs, range
checks declared in field metadata (``bounded``), and what plugins own structured into their own
classes once they have registered: each strategy's params, and the data source's keys of
``[data]``. Every problem names its field path.

Paths: fields declared with ``path_field`` are made absolute against the directory of the recipe
file that set them (a recipe named by ``extends`` anchors its own relative paths), so a resolved
recipe means the same from anywhere.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
import tomllib
import typing
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import attrs
import cattrs
from cattrs.cols import list_structure_factory
from cattrs.errors import ForbiddenExtraKeysError

from kdframe.errors import RecipeError
from kdframe.tracking import tracking_problems
from kdframe.registry import Registry, Strategy
from kdframe.rundir import TEACHER
from kdframe.types import Selected

#: Names that become file and directory names (the run's, a stage's best-NAME.pt): nothing else.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
#: Seeds go to torch, Python and NumPy generators (and NumPy's takes 32 bits).
MAX_SEED = 2**32 - 1

#: ``NAME:rest`` values name a model source a plugin registered (``package:NAME``), never a path.
_SCHEME = re.compile(r"^([a-z][a-z0-9_-]+):")


def bounded(default: Any, *, gt: float | None = None, ge: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    """An attrs field whose range is checked (with its path) after structuring."""
    return attrs.field(default=default, metadata={"bounds": (gt, ge, le, lt)})


def path_field(kind: Literal["dir", "file", "location"], default: str = "", literals: tuple[str, ...] = ()) -> Any:
    """A string field holding a path, made absolute against the recipe that set it.

    ``"dir"``: always a local path. ``"file"``: a local path unless written ``scheme:...`` (say,
    ``package:...``). ``"location"``: a local path when it exists or looks like one (``.``, ``/``,
    ``~``), else an identifier left as written (a hub id, or ``scheme:...`` of a registered model
    source). ``literals`` are words with a meaning of their own, never paths.
    """
    return attrs.field(default=default, metadata={"path": kind, "literals": literals})


@attrs.frozen
class StrategyChoice:
    """``{strategy = "emd", ...params}``: the params are structured once plugins are loaded."""

    strategy: str  # a registered strategy of the slot (Strategies below)
    params: dict[str, Any] = attrs.Factory(dict)  # not a key: the table's other keys are the strategy's params


@attrs.frozen
class LossChoice:
    """A loss term: ``hid = 0.01`` or ``pred = {weight = 1.0, temperature = 2.0}``."""

    weight: float  # the term's factor in the stage's loss; 0 turns the term off
    params: dict[str, Any] = attrs.Factory(dict)  # not a key: the table's other keys are the term's params


@attrs.frozen
class Stage:
    name: str = "distil"  # names the stage in logs, summaries, checkpoints and best-NAME.pt
    epochs: int = bounded(1, ge=0)  # passes over the training data (max_steps can cut them short)
    max_steps: int = bounded(0, ge=0)  # > 0 stops the stage after this many steps
    lr: float = bounded(3e-5, gt=0)  # AdamW's peak learning rate
    batch_size: int = bounded(32, gt=0)  # training examples per step (split over processes when launched)
    eval_batch_size: int = bounded(64, gt=0)  # dev examples per forward at this stage's evaluations
    schedule: Literal["constant", "linear"] = "constant"  # the learning rate after warmup: kept, or decayed to 0
    warmup_ratio: float = bounded(0.0, ge=0, lt=1)  # share of the stage's steps with a linear warmup from 0
    weight_decay: float = bounded(0.01, ge=0)  # AdamW's, on every weight but biases and LayerNorm
    grad_clip: float = bounded(1.0, ge=0)  # 0 turns clipping off
    eval_every: int = bounded(50, ge=0)  # steps; 0 evaluates at the end of each epoch only
    select: Literal["best", "last"] = "best"  # the model the stage ends with: best main dev metric, or the last step's
    log_every: int = bounded(10, gt=0)  # train records and layer weights every N steps
    checkpoint_every: int = bounded(50, ge=0)  # steps; 0 checkpoints only at evaluations
    nonfinite: Literal["stop", "skip"] = "stop"  # a non-finite loss: stop the run (exit 1), or skip that step
    mapping: StrategyChoice | None = None  # which student layer learns from which teacher layers (Strategies)
    weighting: StrategyChoice | None = None  # how the layer weights change as training goes (Strategies)
    losses: dict[str, LossChoice] = attrs.Factory(lambda: {"hard": LossChoice(1.0)})  # term = weight, or a table with weight and params
    controls: dict[str, dict[str, Any]] = attrs.Factory(dict)  # controls that may end the stage early, NAME = {params}: early-stopping = { patience = 3 }


@attrs.frozen
class ModelSpec:
    """Where a model comes from.

    ``init = "pretrained"``: ``model`` is a directory, a hub id or ``SCHEME:...`` of a model source
    a plugin registered (``kdframe plugins`` lists them). ``init = "config"``: random weights from
    ``config`` (the model family's config keys). ``init = "teacher-layers"`` (student only): the
    teacher with only ``layers`` (0-indexed encoder layers) kept. ``tokenizer`` defaults to the
    model's (the teacher's for students).
    """

    init: Literal["pretrained", "config", "teacher-layers"] = "pretrained"  # how the model is made (above)
    model: str = path_field("location")  # a directory, a hub id or SCHEME:... (init = "pretrained")
    tokenizer: str = path_field("location", literals=("teacher",))  # like model; "teacher": the teacher's; empty: the model's, else the teacher's
    layers: list[int] = attrs.Factory(list)  # 0-indexed teacher layers to keep (init = "teacher-layers")
    config: dict[str, Any] = attrs.Factory(dict)  # config keys to set (init = "config"; a student's start from the teacher's)


@attrs.frozen
class StudentSpec(ModelSpec):
    """Where the student comes from, as for the teacher (``init``, ``model``...), and how a new
    regression head starts. A newly initialised output layer has bias 0, so the student first
    predicts about 0, far from labels such as STS-B's 0-5 scale; ``head_bias = "label-mean"`` sets
    that bias to the training labels' mean, so training starts from the best constant prediction.
    A head that came trained (a fine-tuned model) is left as it is."""

    head_bias: Literal["label-mean", "as-loaded"] = "label-mean"  # a new regression head's bias: the training labels' mean, or as the model loader made it (0)


@attrs.frozen
class TeacherSpec(ModelSpec):
    """The teacher, fine-tuned on the task by ``train`` (omit ``train`` for a finished one)."""

    train: Stage | None = None  # the teacher's fine-tuning stage (labels only); omit for a finished teacher
    seed: int = bounded(42, ge=0, le=MAX_SEED)  # the teacher's own seed, so student seeds share one fine-tuned teacher


@attrs.frozen
class DataSpec:
    """``[data]``: the task and how much of it. The data source's own keys (GLUE's ``glue_dir``)
    sit beside these in the same table; the source's plugin declares them (see Data sources)."""

    task: str = "mrpc"  # a registered task (Data sources lists them)
    source: str = ""  # the data source; empty: the one that registered the task
    max_length: int = bounded(128, gt=0, le=4096)  # tokens per example, longer ones truncated
    train_limit: int = bounded(0, ge=0)  # > 0 keeps the first N training examples
    dev_limit: int = bounded(0, ge=0)  # > 0 keeps the first N dev examples
    cache_dir: str = path_field("dir")  # tokenisation/teacher cache; empty: ~/.cache/kdframe
    # The source's keys: as written until the recipe is loaded with the plugins, then the source's params object.
    params: Any = attrs.field(factory=dict, metadata={"source_params": True})


@attrs.frozen
class TeacherCacheSpec:
    """``[teacher_cache]``: reuse the frozen teacher's features per example (kdframe.teacher_cache).

    ``dtype`` is the storage dtype: fp32 reproduces a live forward (to float rounding); bf16 and
    fp16 halve the memory at a relative error of about 4e-3 / 5e-4 per value. ``storage = "disk"``
    keeps them under ``<cache>/teacher-features/<key>/`` for later runs and ablation cells.
    """

    enabled: bool = False  # cache the teacher's features per training example
    max_bytes: int = bounded(4_000_000_000, ge=0)  # past this, the rest is computed live
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # the storage dtype (above)
    storage: Literal["memory", "disk"] = "memory"  # this process only, or on disk for later runs


TRACKERS = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]


@attrs.frozen
class TrackingSpec:
    """``[tracking]``: also send what the run logs (training records, dev scores, layer weights,
    the summary) to experiment trackers, accelerate's (kdframe.tracking names what goes where)."""

    trackers: list[TRACKERS] = attrs.Factory(list)  # e.g. ["tensorboard"]; each needs its package installed
    project: str = ""  # the project (experiment) the trackers file the run under; empty: the recipe's name
    run_name: str = ""  # the run's name in the trackers; empty: the run directory's name
    dir: str = path_field("dir")  # where file-based trackers write (TensorBoard: DIR/PROJECT/RUN); empty: RUN_DIR/tracking


@attrs.frozen
class Recipe:
    data: DataSpec  # the task and its data
    teacher: TeacherSpec  # the model distilled from
    student: StudentSpec  # the model trained
    stages: list[Stage]  # the student's training stages, in order
    name: str = "run"  # names the run directory (runs/NAME-TIME) and reports
    seed: int = bounded(42, ge=0, le=MAX_SEED)  # the student's seed: initialisation, dropout, data order
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when there is one
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; fp16 needs CUDA
    teacher_cache: TeacherCacheSpec = attrs.Factory(TeacherCacheSpec)  # reuse the teacher's features
    tracking: TrackingSpec = attrs.Factory(TrackingSpec)  # experiment trackers (TensorBoard, W&B, MLflow, ...)


# -- structuring ------------------------------------------------------------------------

def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def structure_choice(value: Any, _: type) -> StrategyChoice:
        if isinstance(value, str):
            return StrategyChoice(value)
        if not isinstance(value, dict):
            raise TypeError(f"expected a table with 'strategy' or a strategy name, got {value!r}")
        params = dict(value)
        name = params.pop("strategy", None)
        if not isinstance(name, str):
            raise ValueError("missing key 'strategy' (a string naming a registered strategy)")
        return StrategyChoice(name, params)

    def structure_loss(value: Any, _: type) -> LossChoice:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"a weight must be a finite number >= 0 (0 turns the term off), got {value}")
            return LossChoice(float(value))
        if not isinstance(value, dict):
            raise TypeError(f"expected a weight (number) or a table with 'weight', got {value!r}")
        params = dict(value)
        weight = params.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"'weight' must be a number, got {weight!r}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"'weight' must be a finite number >= 0 (0 turns the term off), got {weight}")
        return LossChoice(float(weight), params)

    # Strict scalars: cattrs' defaults call int()/float()/bool()/str(), which would turn
    # seed = 1.5 into 1, epochs = true into 1 and t2 = "false" into True without a word.
    def strict(kind: type, accepts: tuple[type, ...]) -> None:
        def structure(value: Any, _: type) -> Any:
            if isinstance(value, bool) is not (kind is bool) or not isinstance(value, accepts):
                raise TypeError(f"expected {kind.__name__}")
            if kind is float and not math.isfinite(value):  # TOML writes inf and nan; no setting means them
                raise ValueError(f"must be a finite number, got {value}")
            return kind(value)
        conv.register_structure_hook(kind, structure)

    strict(int, (int,))
    strict(float, (int, float))
    strict(bool, (bool,))
    strict(str, (str,))
    def list_factory(type_: Any, conv_: cattrs.Converter) -> Any:
        structure_items = list_structure_factory(type_, conv_)

        def structure_list(value: Any, t: Any) -> Any:
            # cattrs would turn a string into a list of its characters: seeds = "12" -> [1, 2]
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"expected a list, got {value!r}")
            return structure_items(value, t)

        return structure_list

    conv.register_structure_hook_factory(lambda t: typing.get_origin(t) is list, list_factory)
    # [data] holds the core keys and, flat beside them, the data source's: the rest go to params.
    core_data = cattrs.gen.make_dict_structure_fn(DataSpec, conv, params=cattrs.gen.override(omit=True))
    core_keys = {field.name for field in attrs.fields(DataSpec)} - {"params"}

    def structure_data(value: Any, _: type) -> DataSpec:
        if not isinstance(value, dict):
            raise TypeError(f"expected a table, got {value!r}")
        spec = core_data({k: v for k, v in value.items() if k in core_keys}, DataSpec)
        return attrs.evolve(spec, params={k: v for k, v in value.items() if k not in core_keys})

    def unstructure_data(spec: DataSpec) -> dict[str, Any]:
        params = spec.params if isinstance(spec.params, dict) else conv.unstructure(spec.params)
        return {"task": spec.task, "source": spec.source, **params, "max_length": spec.max_length,
                "train_limit": spec.train_limit, "dev_limit": spec.dev_limit, "cache_dir": spec.cache_dir}

    conv.register_structure_hook(DataSpec, structure_data)
    conv.register_unstructure_hook(DataSpec, unstructure_data)
    conv.register_structure_hook(StrategyChoice, structure_choice)
    conv.register_structure_hook(LossChoice, structure_loss)
    # Unstructure back to the flat table form a recipe is written in.
    conv.register_unstructure_hook(StrategyChoice, lambda c: {"strategy": c.strategy, **c.params})
    conv.register_unstructure_hook(LossChoice, lambda c: {"weight": c.weight, **c.params})
    # Left out of resolved recipes while at its default, so runs made before it existed still resume.
    conv.register_unstructure_hook(Recipe, cattrs.gen.make_dict_unstructure_fn(
        Recipe, conv, teacher_cache=cattrs.gen.override(omit_if_default=True)))
    return conv


converter = _converter()


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        allowed = ", ".join(a.name for a in attrs.fields(exc.cl)) or "none (it takes no parameters)"
        keys = ", ".join(repr(k) for k in sorted(exc.extra_fields))
        return f"unknown key {keys}; allowed: {allowed}"
    if isinstance(exc, KeyError):
        return f"required key {exc.args[0]!r} is missing"
    if typing.get_origin(type_) is Literal:
        return "must be one of " + ", ".join(repr(v) for v in typing.get_args(type_))
    if isinstance(exc, (TypeError, ValueError)) and type_ is not None and str(exc) and not str(exc).startswith("invalid literal"):
        if "expected" in str(exc) or "missing" in str(exc) or "must" in str(exc):
            return str(exc)
    name = getattr(type_, "__name__", None) or str(type_).replace("typing.", "")
    return f"expected {name}"


def _path(raw_path: str) -> str:
    path = raw_path.removeprefix("$").removeprefix(".")
    return path or "(top level)"


def structure(raw: Any, cls: type, root: str = "$") -> tuple[Any, list[str]]:
    """Structure ``raw`` into ``cls``; return (object or None, problems)."""
    try:
        obj = converter.structure(raw, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:  # every problem found
        messages = cattrs.transform_error(exc, path=root, format_exception=_format_exception)
        problems = []
        for message in messages:
            text, _, where = message.rpartition(" @ ")
            problems.append(f"{_path(where)}: {text}")
        return None, problems
    return obj, check_bounds(obj, root)


def check_bounds(obj: Any, path: str = "$") -> list[str]:
    """Range checks from ``bounded`` metadata, walking nested attrs objects, lists and dicts."""
    problems: list[str] = []
    if attrs.has(type(obj)):
        for field in attrs.fields(type(obj)):
            value = getattr(obj, field.name)
            sub = f"{path}.{field.name}"
            bounds = field.metadata.get("bounds")
            if bounds is not None and isinstance(value, (int, float)):
                gt, ge, le, lt = bounds
                for limit, ok, word in ((gt, lambda v, b: v > b, ">"), (ge, lambda v, b: v >= b, ">="),
                                        (le, lambda v, b: v <= b, "<="), (lt, lambda v, b: v < b, "<")):
                    if limit is not None and not ok(value, limit):
                        problems.append(f"{_path(sub)}: must be {word} {limit}, got {value}")
            problems += check_bounds(value, sub)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            problems += check_bounds(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            problems += check_bounds(item, f"{path}.{key}")
    return problems


# -- overrides ----------------------------------------------------------------------------

_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]")


def _parse_path(path: str) -> list[str | int]:
    tokens: list[str | int] = []
    for part in path.split("."):
        if not part:
            raise ValueError("empty path segment")
        pos_in = 0
        while pos_in < len(part):
            match = _TOKEN.match(part, pos_in)
            if not match:
                raise ValueError(f"cannot parse {part!r}")
            tokens.append(match.group(1) if match.group(1) else int(match.group(2)))
            pos_in = match.end()
    return tokens


def parse_value(text: str) -> Any:
    """A TOML literal (``2e-5``, ``true``, ``[1, 2]``, ``"x"``); anything else is a bare string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> tuple[str, ...]:
    """Apply ``PATH=VALUE`` to the raw recipe; missing tables along the path are created.
    Returns the path set, as the table keys leading to it (up to the first list index)."""
    path, sep, value = assignment.partition("=")
    if not sep:
        raise RecipeError([f"--set {assignment!r}: expected PATH=VALUE"])
    try:
        tokens = _parse_path(path.strip())
    except ValueError as exc:
        raise RecipeError([f"--set {assignment!r}: bad path ({exc})"]) from None
    node: Any = raw
    walked = ""
    for token, following in zip(tokens, tokens[1:] + [None]):
        last = following is None
        if isinstance(token, int):
            if not isinstance(node, list) or token >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise RecipeError([f"--set {path}: {walked or '(top level)'} has {size} entries, no [{token}]"])
            walked += f"[{token}]"
        else:
            if not isinstance(node, dict):
                raise RecipeError([f"--set {path}: {walked} is not a table"])
            walked += ("." if walked else "") + token
        if last:
            node[token] = parse_value(value.strip())
        else:
            if isinstance(token, str) and token not in node:
                node[token] = [] if isinstance(following, int) else {}
            node = node[token]
    return tuple(itertools.takewhile(lambda token: isinstance(token, str), tokens))


# -- reading ------------------------------------------------------------------------------

Origins = dict[tuple[str, ...], Path]  # table path of a value -> directory of the recipe file that set it


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path.resolve()}"])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{path.resolve()}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"{path.resolve()}: not valid TOML: {exc}"]) from None
    if not raw:
        raise RecipeError([f"{path.resolve()}: the recipe is empty"])
    return raw


def _leaves(raw: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in raw.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _overlaps(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return a[:len(b)] == b or b[:len(a)] == a


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; any other value (lists included) in ``top`` replaces the base's."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def read_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Origins]:
    """The recipe with ``extends = "base.toml"`` (relative to the recipe) layered under it, and
    where each value came from."""
    path = path.resolve()
    if path in seen:
        raise RecipeError([f"extends: {path} extends itself (through {', '.join(map(str, seen))})"])
    return with_extends(read_toml(path), path.parent, (*seen, path), str(path))


def with_extends(raw: dict[str, Any], base: Path, seen: tuple[Path, ...], where: str) -> tuple[dict[str, Any], Origins]:
    """``raw`` (a recipe written in ``base``) with the recipe it ``extends`` layered under it."""
    parent = raw.pop("extends", None)
    own = dict.fromkeys(_leaves(raw), base)
    if parent is None:
        return raw, own
    if not isinstance(parent, str):
        raise RecipeError([f"extends: expected a path (string) in {where}, got {parent!r}"])
    below, origins = read_with_extends((base / parent).resolve(), seen)
    kept = {key: folder for key, folder in origins.items() if not any(_overlaps(key, mine) for mine in own)}
    return _merge(below, raw), {**kept, **own}


# -- paths --------------------------------------------------------------------------------

def _resolve(value: str, kind: str, base: Path) -> str:
    if not value or (kind in ("file", "location") and _SCHEME.match(value)):
        return value
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    if kind in ("dir", "file") or candidate.exists() or value.startswith((".", "/", "~")):
        return str(candidate.resolve())
    return value  # an identifier, e.g. a hub id


def _resolve_paths(obj: Any, prefix: tuple[str, ...], origins: Origins, default: Path) -> Any:
    """``obj`` with every ``path_field`` (in nested attrs objects and data source params too)
    made absolute against the directory of the recipe that set it."""
    changes = {}
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        key = (*prefix, field.name)
        if field.metadata.get("path") and isinstance(value, str) and value not in field.metadata["literals"]:
            changes[field.name] = _resolve(value, field.metadata["path"], origins.get(key, default))
        elif field.metadata.get("source_params") and attrs.has(type(value)):
            changes[field.name] = _resolve_paths(value, prefix, origins, default)  # flat in [data]
        elif attrs.has(type(value)):
            changes[field.name] = _resolve_paths(value, key, origins, default)
    return attrs.evolve(obj, **changes)


def _model_source_problems(recipe: Recipe, registry: Registry) -> list[str]:
    known = sorted(source.name for source in registry.model_sources())
    problems = []
    for role in ("teacher", "student"):
        for name in ("model", "tokenizer"):
            value = getattr(getattr(recipe, role), name)
            scheme = _SCHEME.match(value)
            if scheme and scheme[1] not in known:
                problems.append(f"{role}.{name}: unknown model source {scheme[1]!r} in {value!r};"
                                f" known: {', '.join(known) or '(none)'}")
    return problems


# -- the data source's keys -----------------------------------------------------------------

def resolve_data(data: DataSpec, registry: Registry) -> tuple[DataSpec, list[str]]:
    """``data`` with its source named and its source's keys structured into the source's params
    class; or the problems (unknown task or source, unknown or ill-typed keys, a task the source
    cannot define from them)."""
    task = registry.task(data.task)
    source = registry.data_source(data.source) if data.source else None
    if data.source and source is None:
        known = ", ".join(sorted(s.name for s in registry.data_sources()))
        return data, [f"data.source: unknown data source {data.source!r}; known: {known}"]
    if source is None or source.task is None:  # a task some plugin registered, read by its source
        if task is None:
            known = ", ".join(sorted(t.name for t in registry.tasks())) or "(no data plugin loaded)"
            defining = sorted(s.name for s in registry.data_sources() if s.task)
            also = f" (or set data.source to {' or '.join(map(repr, defining))} to define your own)" if defining else ""
            return data, [f"data.task: unknown task {data.task!r}; known: {known}{also}"]
        if source is not None and source.name != task.source:
            return data, [f"data.source: task {task.name!r} is read by data source {task.source!r}, not {source.name!r}"]
        source = registry.data_source(task.source)
    elif task is not None:
        return data, [f"data.task: {data.task!r} is a task of data source {task.source!r}; name your own task"
                      f" (it names the run's task in summaries and reports), e.g. task = \"reviews\""]
    elif not PLAIN_NAME.match(data.task):
        return data, [f"data.task: must be a plain name (letters, digits, '_', '-', '.'), got {data.task!r}"]
    own = [field.name for field in attrs.fields(source.params)]
    unknown = sorted(set(data.params) - set(own))
    if unknown:
        allowed = [f.name for f in attrs.fields(DataSpec) if f.name != "params"] + own
        return data, [f"data: unknown key {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"]
    params, problems = structure(data.params, source.params, root="$.data")
    if params is None:
        return data, problems
    resolved = attrs.evolve(data, source=source.name, params=params)
    if source.task is not None and not problems:
        try:
            source.task(data.task, params)
        except RecipeError as exc:
            problems += [f"data.{problem}" for problem in exc.problems]
    return resolved, problems


# -- strategies ---------------------------------------------------------------------------

@attrs.frozen
class ResolvedStage:
    stage: Stage
    mapping: Selected | None
    weighting: Selected | None
    losses: dict[str, Selected]  # active terms only (weight != 0)
    controls: dict[str, Selected] = attrs.Factory(dict)
    sparse_flow: bool = False  # the mapping's Strategy.sparse_flow

    def needs(self, registry: Registry) -> frozenset[str]:
        """Features this stage reads from both models (logits always come)."""
        chosen = [self.mapping, self.weighting, *self.losses.values()]
        slots = ["mapping", "weighting", *["loss"] * len(self.losses)]
        return frozenset().union(*(registry.get(slot, sel.name).needs for slot, sel in zip(slots, chosen) if sel))

    def needs_teacher(self, registry: Registry) -> bool:
        return any(not registry.get("loss", name).student_only for name in self.losses)


def resolve_stage(stage: Stage, registry: Registry, path: str) -> tuple[ResolvedStage, list[str]]:
    problems: list[str] = []

    def choose(slot: str, choice: Any, sub: str, weight: float = 1.0) -> Selected | None:
        try:
            strategy = registry.get(slot, choice.strategy if isinstance(choice, StrategyChoice) else choice, sub)
        except RecipeError as exc:
            problems.extend(exc.problems)
            return None
        raw = choice.params if isinstance(choice, (StrategyChoice, LossChoice)) else {}
        params, found = structure(raw, strategy.params, root="$." + sub.replace("$.", ""))
        problems.extend(found)
        return Selected(strategy.name, params, weight) if params is not None else None

    mapping = choose("mapping", stage.mapping, f"{path}.mapping") if stage.mapping else None
    weighting = choose("weighting", stage.weighting, f"{path}.weighting") if stage.weighting else None
    losses: dict[str, Selected] = {}
    for name, loss in stage.losses.items():
        selected = choose("loss", StrategyChoice(name, loss.params), f"{path}.losses.{name}", loss.weight)
        if selected is not None and loss.weight != 0:
            losses[name] = selected
    controls: dict[str, Selected] = {}
    for name, params in stage.controls.items():
        selected = choose("control", StrategyChoice(name, params), f"{path}.controls.{name}")
        if selected is not None:
            controls[name] = selected
    if not stage.losses or (not losses and not problems):
        problems.append(f"{path}.losses: no loss term has a non-zero weight; known terms: {', '.join(registry.names('loss'))}")
    if stage.weighting is not None and stage.mapping is None:  # not when the mapping is given but invalid
        problems.append(f"{path}.weighting: a weighting needs a mapping; set {path}.mapping")
    if mapping is not None and weighting is not None:
        problems += _marginal_problems(registry.get("mapping", mapping.name), registry.get("weighting", weighting.name),
                                       path)
    sparse = mapping is not None and registry.get("mapping", mapping.name).sparse_flow
    return ResolvedStage(stage, mapping, weighting, losses, controls, sparse), problems


def _marginal_problems(mapping: Strategy, weighting: Strategy, path: str) -> list[str]:
    """A weighting that divides by the flows' marginals is misled by a mapping that reads the layer
    weights without keeping them as its flows' marginals."""
    if not weighting.needs_marginals or mapping.keeps_marginals or mapping.fixed:
        return []
    return [f"{path}.weighting: {weighting.name!r} needs flows whose row and column sums are the layer weights,"
            f" and mapping {mapping.name!r} (plugin {mapping.plugin!r}) does not keep them (keeps_marginals=False);"
            " use weighting \"uniform\" or none with this mapping"]


def resolve_stages(recipe: Recipe, registry: Registry) -> tuple[list[ResolvedStage], ResolvedStage | None, list[str]]:
    """Every stage (and ``teacher.train``) with its strategies' params structured; the problems."""
    problems: list[str] = []
    stages = []
    for i, stage in enumerate(recipe.stages):
        resolved, found = resolve_stage(stage, registry, f"stages[{i}]")
        problems += found
        stages.append(resolved)
    teacher_stage = None
    if recipe.teacher.train is not None:
        teacher_stage, found = resolve_stage(recipe.teacher.train, registry, "teacher.train")
        problems += found
        if any(not registry.get("loss", n).student_only for n in teacher_stage.losses):
            problems.append("teacher.train.losses: the teacher is trained on labels only (e.g. hard = 1.0)")
    return stages, teacher_stage, problems


def _name_problems(recipe: Recipe) -> list[str]:
    """Names are plain (they name files), stage names unique and not the teacher's."""
    plain = "must be a plain name (letters, digits, '_', '-', '.'; it names files), got"
    named = [("name", recipe.name)] + [(f"stages[{i}].name", stage.name) for i, stage in enumerate(recipe.stages)]
    problems = [f"{where}: {plain} {name!r}" for where, name in named if not PLAIN_NAME.match(name)]
    names = [stage.name for stage in recipe.stages]
    problems += [f"stages[{i}].name: {name!r} is {'reserved' if name == TEACHER else 'used twice'};"
                 " give each stage its own name"
                 for i, name in enumerate(names) if name == TEACHER or names.index(name) != i]
    problems += [f"stages[{i}]: epochs = 0 and max_steps = 0 train nothing; give one of them"
                 for i, stage in enumerate(recipe.stages) if stage.epochs == 0 and stage.max_steps == 0]
    if recipe.teacher.train is not None and recipe.teacher.train.epochs == 0 == recipe.teacher.train.max_steps:
        problems.append("teacher.train: epochs = 0 and max_steps = 0 train nothing; give one of them"
                        " (or leave teacher.train out for a finished teacher)")
    return problems


# -- loading ------------------------------------------------------------------------------

def _problems_of_the_parts(raw: Any, registry: Registry) -> list[str]:
    """When the recipe as a whole does not structure, what its parts that do would still report
    (strategy params, the data source's keys): every problem at once, not one pass at a time."""
    if not isinstance(raw, dict):
        return []
    problems: list[str] = []
    parts = [(f"stages[{i}]", stage) for i, stage in enumerate(raw.get("stages") or []) if isinstance(raw.get("stages"), list)]
    teacher = raw.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("train"), dict):
        parts.append(("teacher.train", teacher["train"]))
    for where, part in parts:
        stage, found = structure(part, Stage)
        if stage is not None and not found:
            problems += resolve_stage(stage, registry, where)[1]
    data, found = structure(raw.get("data", {}), DataSpec)
    if data is not None and not found:
        problems += resolve_data(data, registry)[1]
    return problems


@attrs.frozen
class LoadedRecipe:
    """A recipe read and checked against the registered plugins.

    ``recipe`` has absolute paths and its data source's keys structured; ``stages`` (one per
    ``[[stages]]``) and ``teacher_stage`` (``teacher.train``) have their strategies' params
    structured. ``problems`` lists everything wrong, each with its field path (empty: valid).
    """

    recipe: Recipe
    stages: list[ResolvedStage]
    teacher_stage: ResolvedStage | None
    problems: list[str]


#: A recipe as ``load_recipe`` takes it: a TOML file, or its content as a dict (from Python).
RecipeSource = typing.Union[str, Path, Mapping[str, Any]]


def recipe_origin(source: RecipeSource) -> str:
    """How errors name a recipe: its file, or that it was given in Python."""
    return "the recipe given in Python" if isinstance(source, Mapping) else str(Path(source).resolve())


def load_recipe(source: RecipeSource, overrides: list[str], registry: Registry) -> LoadedRecipe:
    """Read, override, structure and resolve a recipe; every problem found is in ``problems``.

    ``source`` is a TOML file (its relative paths and ``extends`` are relative to it) or the
    recipe as a dict (relative to the working directory). Raises only when the recipe cannot be
    structured at all (a RecipeError with every problem of that pass).
    """
    if isinstance(source, Mapping):
        base = Path.cwd()
        raw, origins = with_extends(copy.deepcopy(dict(source)), base, (), recipe_origin(source))
    else:
        raw, origins = read_with_extends(Path(source))
        base = Path(source).resolve().parent
    for assignment in overrides:
        key = apply_override(raw, assignment)
        origins = {k: v for k, v in origins.items() if not _overlaps(k, key)}  # relative to the recipe itself
    recipe, problems = structure(raw, Recipe)
    if recipe is None:
        raise RecipeError(problems + _problems_of_the_parts(raw, registry), source=recipe_origin(source))
    if not recipe.stages:
        problems.append("stages: at least one [[stages]] table is required")
    problems += _name_problems(recipe)
    problems += tracking_problems(recipe.tracking)
    data, found = resolve_data(recipe.data, registry)
    problems += found + _model_source_problems(recipe, registry)
    recipe = _resolve_paths(attrs.evolve(recipe, data=data), (), origins, base)
    stages, teacher_stage, found = resolve_stages(recipe, registry)
    return LoadedRecipe(recipe, stages, teacher_stage, problems + found)


def to_plain(obj: Any) -> Any:
    """Unstructure a recipe (or part) to plain TOML-able data."""
    return converter.unstructure(obj)
