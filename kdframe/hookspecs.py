"""The hook points of kdframe. Each function here documents one hook; plugins implement them
with ``@kdframe.api.hookimpl`` and the same name. ``firstresult`` hooks stop at the first plugin
that returns something other than None; the others collect every plugin's answer.

Each docstring has three parts that ``python -m kdframe.docgen`` renders into docs/hooks.md: what
the hook does, ``Called:`` (when the engine or the CLI calls it) and ``Example::`` (an
implementation as a plugin module writes it).

Order inside one training step of a distillation stage (``kdframe.step``):
extract_features(teacher) -> extract_features(student) -> layer_costs -> layer_mapping (per cost
kind) -> update_layer_weights -> loss_terms -> backward/optimizer -> step_end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import argparse

    import torch

    from kdframe.registry import Registry
    from kdframe.types import Control, Features, LayerWeights, LoadedModel, StageContext, TaskInfo, TokenizedSplit

hookspec = pluggy.HookspecMarker("kdframe")


@hookspec
def kdframe_register(registry: Registry) -> None:
    """Register the names this plugin owns: strategies for the ``mapping``, ``weighting`` and
    ``loss`` slots (``registry.add``), data sources (``add_data_source``) and the tasks they read
    (``add_task``), and location schemes of models (``add_model_source``, e.g. ``package``).

    A name already taken in its kind is an error naming both plugins, so no plugin shadows another.

    Called: once per command, right after every plugin is loaded (``kdframe run``, ``validate``,
    ``plugins``, ...), before any recipe is read.

    Example::

        @attrs.frozen
        class SinkhornParams:
            reg: float = bounded(0.1, gt=0)

        @hookimpl
        def kdframe_register(registry):
            registry.add("mapping", "sinkhorn", params=SinkhornParams, description="entropic OT")
            registry.add("loss", "cos", needs=("cls",), description="cosine of [CLS] vectors")
            registry.add_data_source("sick", params=SickParams, description="the SICK corpus")
            registry.add_task(TaskInfo("sick", 3, ("accuracy",), "accuracy"), source="sick")
    """


@hookspec
def kdframe_add_cli_options(parser: argparse.ArgumentParser) -> None:
    """Add options to the ``kdframe run`` and ``kdframe validate`` parsers.

    Use a prefix for option names (``--sinkhorn-x``); the parsed values reach
    ``kdframe_run_start`` as ``run.options`` (a dict).

    Called: while the ``kdframe run`` and ``kdframe validate`` parsers are built, before arguments
    are parsed.

    Example::

        @hookimpl
        def kdframe_add_cli_options(parser):
            group = parser.add_argument_group("wandb plugin")
            group.add_argument("--wandb-project", help="log metrics to this W&B project")
    """


@hookspec
def kdframe_validate_recipe(recipe: Any, registry: Registry) -> list[str]:
    """Return problems with a resolved recipe, each a string starting with its field path; an
    empty list when all is well. Every plugin's problems are reported together.

    Called: by ``kdframe run``, ``validate`` and ``export`` (and each ablation cell) after the
    recipe is structured and its strategies resolved, before any model or data is loaded.

    Example::

        @hookimpl
        def kdframe_validate_recipe(recipe, registry):
            return [f"stages[{i}].weighting: sinkhorn needs a weighting (uniform keeps the weights)"
                    for i, stage in enumerate(recipe.stages)
                    if stage.mapping and stage.mapping.strategy == "sinkhorn" and stage.weighting is None]
    """


@hookspec(firstresult=True)
def kdframe_load_data(
    data: Any, task: TaskInfo, split: str, tokenizer: Any, cache_dir: str
) -> TokenizedSplit | None:
    """Load and tokenise one split (``train`` or ``dev``) of the recipe's ``[data]`` section.

    Answer only when ``data.source`` is a data source you registered; ``data.params`` is your
    params object (your own ``[data]`` keys). ``cache_dir`` is kdframe's cache directory (keep
    what you cache in a folder of your own under it). Errors in the data are raised as
    ``kdframe.api.DataError`` naming the file and line.

    Called: after the models are loaded (with the student's tokenizer), for ``train``, then
    ``dev``; not by ``kdframe export``.

    Return a ``TokenizedSplit``: ``kdframe.api.tokenize_to_arrow`` builds one from a
    ``datasets.Dataset`` of raw text, cached as a memory-mapped Arrow file (``from_lists`` makes
    a small one in memory).

    Example::

        @hookimpl
        def kdframe_load_data(data, task, split, tokenizer, cache_dir):
            if data.source != "sick":
                return None
            path = Path(data.params.directory) / f"{split}.csv"
            return tokenize_to_arrow(
                task, split, origin=[str(path), path.stat().st_mtime_ns],
                build=lambda: datasets.load_dataset("csv", data_files=str(path), split="train"),
                text_columns=("sentence_A", "sentence_B"), label_column="relatedness",
                tokenizer=tokenizer, max_length=data.max_length, cache_dir=cache_dir, where=str(path))
    """


@hookspec(firstresult=True)
def kdframe_data_fingerprint(data: Any) -> str | None:
    """Identify the content of the recipe's ``[data]`` (a digest of its files, say), or return None
    when ``data.source`` is not yours.

    Fine-tuned teachers are cached under a key made of this instead of the data's location: a
    moved checkout keeps its teachers, and an edited data file gets a new teacher instead of a
    stale one. Without an answer the key uses the ``[data]`` section as written, paths included.

    Called: when a run needs a fine-tuned teacher (before looking in the teacher cache), and when
    ``kdframe ablate`` plans which cells fine-tune a teacher (a KdframeError raised here, say for a
    missing file, fails that cell before any cell starts).

    Example::

        @hookimpl
        def kdframe_data_fingerprint(data):
            if data.source != "sick":
                return None
            files = [Path(data.params.directory) / name for name in ("train.tsv", "dev.tsv")]
            return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    """


@hookspec(firstresult=True)
def kdframe_compute_metrics(task: TaskInfo, predictions: Any, labels: Any) -> dict[str, float]:
    """Compute the task's metrics from predictions (class ids, or scores for regression).

    Called: after every dev evaluation: the teacher's, and each stage's at ``eval_every`` and at
    its end.

    Example::

        @hookimpl
        def kdframe_compute_metrics(task, predictions, labels):
            if task.metrics != ("accuracy",):
                return None
            return {"accuracy": float((predictions == labels).mean())}
    """


@hookspec(firstresult=True)
def kdframe_load_model(
    role: str, spec: Any, task: TaskInfo, teacher: LoadedModel | None, base_dir: str, cache_dir: str
) -> LoadedModel | None:
    """Load or build the ``teacher`` or ``student`` model described by ``spec``.

    For the student, ``teacher`` is the loaded teacher (a student may be built from its layers).
    ``base_dir`` is the recipe's directory, against which relative paths resolve; ``cache_dir``
    is kdframe's cache directory (keep what you unpack or convert in a folder of your own under
    it). Set ``LoadedModel.features`` to what you can extract from the model. Answer only for
    the models you load (a scheme you registered with ``add_model_source``, say): the bundled
    Hugging Face loader takes everything else.

    Called: once per command that loads a recipe: the teacher first, then the student (given the
    teacher).

    Example::

        @hookimpl
        def kdframe_load_model(role, spec, task, teacher, base_dir):
            if not spec.model.startswith("onnx:"):
                return None  # the Hugging Face plugin handles the rest
            return load_onnx_model(spec.model.removeprefix("onnx:"), task, base_dir)
    """


@hookspec(firstresult=True)
def kdframe_export_model(loaded: LoadedModel, out_dir: str, task: TaskInfo, max_length: int) -> str | None:
    """Write ``loaded`` (model and tokenizer) to ``out_dir`` in its framework's own format, so
    that it loads without kdframe; return a one-line description of what was written.

    ``task`` is what the model was trained for (its labels' names belong in the export) and
    ``max_length`` the token length it was trained at (the exported tokenizer's limit).

    Called: by ``kdframe export RUN_DIR OUT``, with the run's final student.

    Example::

        @hookimpl
        def kdframe_export_model(loaded, out_dir, task, max_length):
            if not isinstance(loaded.model, MyModel):
                return None
            loaded.model.save(out_dir, labels=task.names, max_length=max_length)
            return f"MyModel with {loaded.num_layers} layers in {out_dir}"
    """


@hookspec(firstresult=True)
def kdframe_extract_features(
    role: str, model: torch.nn.Module, batch: dict[str, torch.Tensor], needs: frozenset[str]
) -> Features | None:
    """Run ``model`` on ``batch`` and return the features named in ``needs``.

    ``needs`` is a subset of ``kdframe.api.EXTRACTABLE``; logits are always returned. (A
    strategy's ``cls`` need arrives here as ``hidden``; the engine keeps the first position.) The
    teacher is called under ``torch.no_grad()`` and in eval mode by the engine.

    Called: every training step, teacher (under ``no_grad``, in eval mode) then student; at every
    dev evaluation with empty ``needs`` (logits only); once per stage by ``kdframe validate``.

    Example::

        @hookimpl
        def kdframe_extract_features(role, model, batch, needs):
            if not isinstance(model, MyModel):
                return None
            out = model(batch["input_ids"], batch["attention_mask"], return_hidden="hidden" in needs)
            return Features(logits=out.logits, mask=batch["attention_mask"], hidden=out.hidden)
    """


@hookspec
def kdframe_layer_costs(
    student: Features, teacher: Features, ctx: StageContext,
    pairs: Callable[[str, int, int], torch.Tensor | None],
) -> dict[str, torch.Tensor]:
    """Return cost matrices (M x N, student layers 1..M against teacher layers 1..N), keyed by
    feature kind (``att``, ``hid``, ...). The matrices keep their autograd graph.

    ``pairs(kind, M, N)`` is, for a fixed mapping (``Strategy.fixed``), the boolean M x N mask of
    the pairs its flow uses, else None: only those pairs need computing (leave the others 0; they
    carry no flow). With ``ctx.sparse_flow`` a plugin may compute the matrices without autograd
    and its loss terms on the pairs with flow only.

    Every plugin's dict is merged; two plugins returning the same kind is an error.

    Called: every training step of a stage with a teacher, after both models' features; once per
    stage by ``kdframe validate``.

    Example::

        @hookimpl
        def kdframe_layer_costs(student, teacher, ctx):
            if not ctx.active("cos"):
                return {}
            s = F.normalize(torch.stack([h[:, 0] for h in student.hidden[1:]]), dim=-1)  # (M, B, d)
            t = F.normalize(torch.stack([h[:, 0] for h in teacher.hidden[1:]]), dim=-1)  # (N, B, d)
            return {"cos": 1 - torch.einsum("mbd,nbd->mn", s, t) / s.shape[1]}
    """


@hookspec(firstresult=True)
def kdframe_layer_mapping(
    kind: str, cost: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], ctx: StageContext
) -> torch.Tensor | None:
    """Turn a cost matrix (M x N) and layer weights (student M, teacher N) into a flow (M x N).

    Implement it for the strategy ``ctx.mapping.name`` only; return None for any other. The flow
    is a constant for backprop (detached), non-negative, on the cost's device and dtype.
    ``kdframe.api.solve_transport`` and ``fixed_flow`` do the common parts.

    Called: every training step, once per cost kind, right after ``kdframe_layer_costs``, with the
    kind's current layer weights (uniform at the start of a stage); once per kind by
    ``kdframe validate``.

    Example::

        @hookimpl
        def kdframe_layer_mapping(kind, cost, weights, ctx):
            if ctx.mapping is None or ctx.mapping.name != "sinkhorn":
                return None  # not ours: let the plugin that owns ctx.mapping answer
            return solve_transport(cost, weights, lambda d, a, b: sinkhorn(d, a, b, ctx.mapping.params))
    """


@hookspec(firstresult=True)
def kdframe_update_layer_weights(
    flows: dict[str, torch.Tensor],
    costs: dict[str, torch.Tensor],
    weights: LayerWeights,
    ctx: StageContext,
) -> LayerWeights | None:
    """Return the layer weights (student, teacher) per cost kind for the next step.

    Implement it for the strategy ``ctx.weighting.name`` only. Weights must stay on the
    simplex, finite and strictly positive. The engine checkpoints them.

    Called: every training step of a stage with a ``weighting``, after the mappings; the weights
    it returns are used by the next step's mappings.

    Example::

        @hookimpl
        def kdframe_update_layer_weights(flows, costs, weights, ctx):
            if ctx.weighting is None or ctx.weighting.name != "ema":
                return None
            rate = ctx.weighting.params.rate
            return {kind: ((1 - rate) * w_s + rate * flows[kind].sum(1), (1 - rate) * w_t + rate * flows[kind].sum(0))
                    for kind, (w_s, w_t) in weights.items()}
    """


@hookspec
def kdframe_loss_terms(
    student: Features,
    teacher: Features | None,
    costs: dict[str, torch.Tensor],
    flows: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    ctx: StageContext,
) -> dict[str, torch.Tensor]:
    """Return scalar loss terms by name, only for terms active in ``ctx.losses``.

    The engine multiplies each by its recipe weight and sums them.

    Called: every training step after the mappings and the weighting; once per stage by
    ``kdframe validate`` (to check that every active term is computed by some plugin).

    Example::

        @hookimpl
        def kdframe_loss_terms(student, teacher, costs, flows, batch, ctx):
            if not ctx.active("cos"):
                return {}
            return {"cos": (flows["cos"] * costs["cos"]).sum()}
    """


@hookspec
def kdframe_extra_parameters(ctx: StageContext) -> dict[str, torch.nn.Module]:
    """Return trainable modules owned by strategies for this stage (e.g. the projection W_h).

    They are trained with the student, saved in checkpoints and never exported.

    Called: at the start of each stage, before ``kdframe_stage_start``; the modules join the
    optimizer and the checkpoints.

    Example::

        @hookimpl
        def kdframe_extra_parameters(ctx):
            if not ctx.active("cos"):
                return {}
            ctx.state["cos.proj"] = torch.nn.Linear(ctx.student_hidden_size, ctx.teacher_hidden_size)
            return {"cos.proj": ctx.state["cos.proj"]}  # read it back from ctx.state in your other hooks
    """


@hookspec
def kdframe_run_start(run: Any) -> None:
    """A run begins: its directory exists and models and data are loaded.

    Called: once per ``kdframe run``, after the run directory is created, before the teacher is
    fine-tuned.

    Example::

        @hookimpl
        def kdframe_run_start(run):
            run.progress.message(f"wandb: logging {run.session.recipe.name}")
    """


@hookspec
def kdframe_stage_start(ctx: StageContext) -> None:
    """A stage begins (also when it resumes). Raise ``ModelError`` here for layouts your strategy
    cannot handle: the user learns before training.

    Called: before the first step of every stage (the teacher's fine-tuning too, with
    ``ctx.stage_index == -1``), also when resuming one, and once per stage by ``kdframe validate``.

    Example::

        @hookimpl
        def kdframe_stage_start(ctx):
            if ctx.mapping and ctx.mapping.name == "sinkhorn" and ctx.teacher_layers < 2:
                raise ModelError("mapping sinkhorn: the teacher needs at least 2 layers")
    """


@hookspec
def kdframe_step_end(ctx: StageContext, record: dict[str, Any]) -> Control | None:
    """An optimizer step ended; ``record`` holds its loss, lr and each term (``skipped: true`` and
    no loss for a skipped non-finite step). Return a ``kdframe.api.Control`` to ask the engine to
    evaluate, save a checkpoint or stop the stage after this step (or None: nothing).

    Called: after every optimizer step (and every skipped non-finite step) of every stage; the
    record is also written to metrics.jsonl every ``log_every`` steps.

    Example::

        @hookimpl
        def kdframe_step_end(ctx, record):
            if record.get("loss", 0.0) > 50:  # diverging: evaluate now and end the stage
                return Control(stop=True, reason=f"loss {record['loss']:.1f} at step {ctx.step}")
            return None
    """


@hookspec
def kdframe_eval_end(ctx: StageContext, metrics: dict[str, float]) -> Control | None:
    """A dev evaluation ended with ``metrics``. Return a ``Control`` to stop the stage (or save a
    checkpoint) after it, or None. The stage's ``controls`` (its recipe's control strategies, with
    their params) are in ``ctx.controls``: the bundled ``early-stopping`` is one.

    Called: after each dev evaluation inside a stage (``eval_every``, end of epoch or stage, or
    when a plugin asked for one).

    Example::

        @hookimpl
        def kdframe_eval_end(ctx, metrics):
            chosen = ctx.controls.get("target")  # registered: registry.add("control", "target", TargetParams)
            if chosen and metrics[ctx.task.main_metric] >= chosen.params.value:
                return Control(stop=True, reason=f"reached {chosen.params.value}")
            return None
    """


@hookspec
def kdframe_stage_end(ctx: StageContext) -> None:
    """A stage ended.

    Called: after a stage's last step and its best-or-last model selection.

    Example::

        @hookimpl
        def kdframe_stage_end(ctx):
            ctx.state.pop("cos.proj", None)  # the next stage builds its own
    """


@hookspec
def kdframe_run_end(run: Any, summary: dict[str, Any]) -> None:
    """A run finished, with the summary written to summary.json.

    Called: once per successful ``kdframe run``, after summary.json and student.pt are written.

    Example::

        @hookimpl
        def kdframe_run_end(run, summary):
            wandb.summary.update(summary["student"]["best"])
    """


@hookspec
def kdframe_on_exception(run: Any, exc: BaseException) -> None:
    """A run stops with an exception (including Ctrl-C).

    Called: when ``kdframe run`` stops with any exception (a failed step, Ctrl-C), before the CLI
    prints the error and exits.

    Example::

        @hookimpl
        def kdframe_on_exception(run, exc):
            wandb.finish(exit_code=1)
    """


@hookspec
def kdframe_state_dict(ctx: StageContext) -> dict[str, Any]:
    """Return ``{plugin_key: state}`` to store in a checkpoint (tensors and plain data only:
    checkpoints load with ``weights_only=True``). Prefix keys with your plugin's name.

    Called: whenever a checkpoint is written: at evaluations, every ``checkpoint_every`` steps and
    on Ctrl-C. Check yours with ``kdframe.testing.check_state_roundtrip``.

    Example::

        @hookimpl
        def kdframe_state_dict(ctx):
            return {"ema.history": ctx.state.get("ema.history", torch.zeros(0))}
    """


@hookspec
def kdframe_load_state_dict(ctx: StageContext, state: dict[str, Any]) -> None:
    """Restore what ``kdframe_state_dict`` returned; take your own key from ``state``.

    Called: on ``kdframe run --resume``, when the interrupted stage restarts, after
    ``kdframe_extra_parameters`` and ``kdframe_stage_start``.

    Example::

        @hookimpl
        def kdframe_load_state_dict(ctx, state):
            if "ema.history" in state:
                ctx.state["ema.history"] = state["ema.history"]
    """
