"""The training engine: a plain loop over stages and steps that reaches every method through hooks.

Read top to bottom: ``prepare`` loads and validates everything (recipe, strategies, task, models,
data) before any training; ``Trainer.run`` fine-tunes the teacher if needed, then runs each
distillation stage; ``Trainer.train_stage`` is the step loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import attrs
import torch

from kdframe import checkpoint
from kdframe.errors import KdframeError, PluginError, RecipeError, RunFailed
from kdframe.parallel import Processes
from kdframe.plugins import PluginHost, load_plugins
from kdframe.progress import Progress
from kdframe.recipe import Recipe, ResolvedStage, load_recipe, resolve_recipe, resolve_stage, to_plain
from kdframe.rundir import PROGRESS, RunDir, recipe_toml
from kdframe.teacher_cache import TeacherCache, open_teacher_cache
from kdframe.types import Features, LoadedModel, StageContext, TaskInfo, TokenizedSplit

TEACHER = "teacher"


class Interrupted(Exception):
    """Ctrl-C during training: a checkpoint was written; the message says how to resume."""

    exit_code = 130


@attrs.define
class Session:
    """A recipe with everything it needs loaded and checked."""

    recipe: Recipe
    recipe_path: Path
    host: PluginHost
    stages: list[ResolvedStage]
    teacher_stage: ResolvedStage | None
    task: TaskInfo
    teacher: LoadedModel | None = None
    student: LoadedModel | None = None
    train: TokenizedSplit | None = None
    dev: TokenizedSplit | None = None

    @property
    def needs_teacher(self) -> bool:
        return any(stage.needs_teacher(self.host.registry) for stage in self.stages)

    def resolved_toml(self) -> str:
        return recipe_toml(to_plain(self.recipe))


def prepare(recipe_path: str | Path, overrides: list[str] = (), plugin_args: list[str] = (),
            load_data: bool = True) -> Session:
    """Load plugins, the recipe, models and data; every problem is bad input (exit 2)."""
    host = load_plugins(plugin_args)
    recipe, problems = load_recipe(recipe_path, list(overrides))
    stages, found = resolve_recipe(recipe, host.registry)
    problems += found
    teacher_stage = None
    if recipe.teacher.train is not None:
        teacher_stage, _ = resolve_stage(recipe.teacher.train, host.registry, "teacher.train")
    names = [stage.name for stage in recipe.stages]
    for i, name in enumerate(names):
        if name == TEACHER or names.index(name) != i:
            problems.append(f"stages[{i}].name: {name!r} is {'reserved' if name == TEACHER else 'used twice'}; give each stage its own name")
    for found in host.call("kdframe_validate_recipe", recipe=recipe, registry=host.registry):
        problems.extend(found or [])
    task = host.pm.hook.kdframe_task_info(name=recipe.data.task)
    if task is None:
        known = sorted(n for names in host.call("kdframe_task_names") for n in names)
        problems.append(f"data.task: unknown task {recipe.data.task!r}; known: {', '.join(known) or '(no data plugin loaded)'}")
    if recipe.precision == "fp16" and not torch.cuda.is_available():
        problems.append("precision: 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
    if recipe.device == "cuda" and not torch.cuda.is_available():
        problems.append("device: 'cuda' asked for, but no CUDA device is available")
    if problems:
        raise RecipeError(problems, source=str(Path(recipe_path).resolve()))

    session = Session(recipe, Path(recipe_path).resolve(), host, stages, teacher_stage, task)
    checkpoint.seed_everything(recipe.seed)  # random-init models must not depend on what ran before
    base_dir = str(session.recipe_path.parent)
    session.teacher = host.first("kdframe_load_model", f"a loader for teacher init {recipe.teacher.init!r}",
                                 role="teacher", spec=recipe.teacher, task=task, teacher=None, base_dir=base_dir)
    session.student = host.first("kdframe_load_model", f"a loader for student init {recipe.student.init!r}",
                                 role="student", spec=recipe.student, task=task, teacher=session.teacher,
                                 base_dir=base_dir)
    if load_data:
        for split in ("train", "dev"):
            loaded = host.first("kdframe_load_data", f"data for task {task.name!r}", data=recipe.data, task=task,
                                split=split, tokenizer=session.student.tokenizer, cache_dir=recipe.data.cache_dir or None)
            setattr(session, split, loaded)
    return session


# -- small pieces of the loop -----------------------------------------------------------------

def collate(split: TokenizedSplit, indices: list[int], device: torch.device,
            length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest example (dynamic padding), or to ``length``."""
    length = length or max(len(split.input_ids[i]) for i in indices)
    ids = torch.zeros(len(indices), length, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(indices):
        n = len(split.input_ids[i])
        ids[row, :n] = torch.tensor(split.input_ids[i])
        types[row, :n] = torch.tensor(split.token_type_ids[i])
        mask[row, :n] = 1
    dtype = torch.float32 if split.task.is_regression else torch.long
    labels = torch.tensor([split.labels[i] for i in indices], dtype=dtype)
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def extract_features(host: PluginHost, role: str, loaded: LoadedModel, batch: dict[str, torch.Tensor],
                     needs: frozenset[str]) -> Features:
    return host.first("kdframe_extract_features", f"feature extraction for {loaded.description}",
                      role=role, model=loaded.model, batch=batch, needs=needs)


def stage_context(run_dir: Path | None, index: int, resolved: ResolvedStage, task: TaskInfo, student: LoadedModel,
                  teacher: LoadedModel | None, device: torch.device) -> StageContext:
    return StageContext(
        run_dir=run_dir, stage_index=index, stage=resolved.stage, task=task,
        student_layers=student.num_layers, teacher_layers=teacher.num_layers if teacher else 0,
        student_hidden_size=student.hidden_size, teacher_hidden_size=teacher.hidden_size if teacher else 0,
        student_heads=student.num_heads, teacher_heads=teacher.num_heads if teacher else 0,
        mapping=resolved.mapping, weighting=resolved.weighting, losses=resolved.losses, device=device,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def schedule(kind: str, warmup_ratio: float, total: int):
    warmup = int(total * warmup_ratio)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        return 1.0

    return factor


def param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (BERT practice)."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad:
                (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(modules: list[torch.nn.Module], weight_decay: float, lr: float, device: torch.device) -> torch.optim.AdamW:
    """The stages' optimizer. Fused on CPU and CUDA: one kernel over all parameters instead of a
    Python loop, 5x faster on CPU for a MiniLM student and equal to 1e-7 (docs/performance.md)."""
    return torch.optim.AdamW(param_groups(modules, weight_decay), lr=lr, fused=device.type in ("cpu", "cuda"))


def uniform_weights(m: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((m,), 1.0 / m, device=device), torch.full((n,), 1.0 / n, device=device)


def check_flow(host: PluginHost, ctx: StageContext, kind: str, flow: Any, cost: torch.Tensor) -> None:
    """A mapping must return an M x N tensor for an M x N cost; else name the strategy and its plugin."""
    if isinstance(flow, torch.Tensor) and flow.shape == cost.shape:
        return
    name = ctx.mapping.name if ctx.mapping else "(none)"
    plugin = host.registry.get("mapping", name).plugin if ctx.mapping else "?"
    got = f"a flow of shape {tuple(flow.shape)}" if isinstance(flow, torch.Tensor) else f"a {type(flow).__name__}"
    where = f"stages[{ctx.stage_index}]: " if ctx.stage_index >= 0 else "teacher.train: "
    raise PluginError(f"{where}mapping {name!r} (plugin {plugin!r}) returned {got} for cost {kind!r};"
                      f" expected shape {tuple(cost.shape)} (student x teacher layers)")


def teacher_cache_key(recipe: Recipe, host: PluginHost) -> str:
    """A fine-tuned teacher depends on its spec, its training stage, the data's content and precision."""
    plain = to_plain(recipe)
    data = dict(plain["data"], cache_dir="")
    content = host.call("kdframe_data_fingerprint", data=recipe.data)
    if content is not None:  # the content stands for the files: where they are does not matter
        data.update(glue_dir="", content=content)
    key = json.dumps({"teacher": plain["teacher"], "data": data, "precision": recipe.precision}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def cache_root(recipe: Recipe) -> Path:
    import os

    if recipe.data.cache_dir:
        return Path(recipe.data.cache_dir)
    return Path(os.environ.get("KDFRAME_CACHE", Path.home() / ".cache" / "kdframe"))


def teacher_cache_path(recipe: Recipe, host: PluginHost) -> Path:
    """Where a fine-tuned teacher is cached, shared by every run (and ablation cell) with the same key."""
    return cache_root(recipe) / "teachers" / f"{teacher_cache_key(recipe, host)}.pt"


# -- the trainer --------------------------------------------------------------------------------

class Trainer:
    def __init__(self, session: Session, run_dir: RunDir, progress: Progress, options: dict[str, Any] | None = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        recipe = session.recipe
        self.session = session
        self.options = options or {}  # parsed command-line options, plugins' own included
        self.host = session.host
        self.run_dir = run_dir
        self.progress = progress
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.precision]
        AcceleratorState._reset_state(True)  # a process may run recipes of other precisions (ablation cells)
        # Under a launcher (torchrun) on a machine without CUDA, accelerate sets up gloo only when told cpu=True.
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        cpu = recipe.device == "cpu" or (launched and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed)
        self.device = self.accelerator.device
        # Data parallel: this process's rank among `world` processes (0 of 1 without a launcher).
        self.processes = Processes(self.accelerator)
        self.rank, self.world, self.is_main = self.processes.rank, self.processes.world, self.processes.is_main
        if not self.is_main:
            self.progress = Progress("off")  # progress output from the main process only
        self.stop_requested = False
        self.sigint_at: float | None = None

    # Ctrl-C sets a flag; the loop finishes its step, checkpoints and stops cleanly.
    def _on_sigint(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.sigint_at is not None:
            if self.world > 1 and now - self.sigint_at < 2.0:
                return  # torchrun forwards the terminal's Ctrl-C to its workers: one press, two signals
            raise KeyboardInterrupt
        self.sigint_at = now
        self.stop_requested = True
        self.progress.message("interrupt: finishing the current step and writing a checkpoint (Ctrl-C again to abort)")

    def save(self, obj: Any, path: Path) -> None:
        """Only the main process writes files; the others hold the same state."""
        if self.is_main:
            checkpoint.save_atomic(obj, path)

    def run(self, resume: bool) -> dict[str, Any]:
        s = self.session
        started = time.monotonic()
        checkpoint.seed_everything(s.recipe.seed)
        state = checkpoint.load(self.run_dir.checkpoint) if resume and self.run_dir.checkpoint.exists() else None
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self.host.call("kdframe_run_start", run=self)
            # Summaries of stages finished before an interruption come back from the checkpoint.
            self.stage_summaries = dict(state.get("summaries", {})) if state is not None else {}
            summary: dict[str, Any] = {"task": s.task.name, "seed": s.recipe.seed, "stages": self.stage_summaries}
            if s.needs_teacher:
                summary["teacher"] = self.prepare_teacher(state)
            if state is not None and state.get("stage") != TEACHER:
                s.student.model.load_state_dict(state["model"])
            for index, resolved in enumerate(s.stages):
                key = resolved.stage.name
                if state is not None and state.get("stage_index", -1) > index:
                    continue  # finished before the interruption; its result is in the loaded model
                resume_state = state if state is not None and state.get("stage") == key else None
                summary["stages"][key] = self.train_stage(index, s.student, s.teacher if s.needs_teacher else None,
                                                          resolved, resume_state)
            last = summary["stages"][s.stages[-1].stage.name]
            summary["student"] = {
                "description": s.student.description,
                "params": count_parameters(s.student.model),
                "best": last["best"],
                "best_step": last["best_step"],
                "final": last["final"],
                "selected": last["selected"],
            }
            summary["main_metric"] = s.task.main_metric
            summary["wall_time_s"] = round(time.monotonic() - started, 2)
            self.save(s.student.model.state_dict(), self.run_dir.path / "student.pt")
            self.run_dir.write_json("summary.json", summary)
            self.host.call("kdframe_run_end", run=self, summary=summary)
            return summary
        except BaseException as exc:
            self.host.call("kdframe_on_exception", run=self, exc=exc)
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
            self.progress.stop()

    # -- teacher ------------------------------------------------------------------------------
    def prepare_teacher(self, state: dict[str, Any] | None) -> dict[str, Any]:
        """Fine-tune the teacher (or take it from this run or the shared cache); evaluate it."""
        s = self.session
        teacher = s.teacher
        # Only a fine-tuned teacher is cached (its key reads the data files to fingerprint them).
        cached = teacher_cache_path(s.recipe, self.host) if s.teacher_stage is not None else None
        # The main process looks at the files: another process must not see one it has just written.
        found = self.processes.from_main("run" if self.run_dir.teacher.exists()
                                         else "cache" if cached is not None and cached.exists() else None)
        if found == "run":
            teacher.model.load_state_dict(checkpoint.load(self.run_dir.teacher))
            source = "this run"
        elif found == "cache":
            teacher.model.load_state_dict(checkpoint.load(cached))
            source = f"cache {cached}"
        elif cached is not None:
            resume_state = state if state is not None and state.get("stage") == TEACHER else None
            generator_state = torch.get_rng_state()
            torch.manual_seed(s.recipe.teacher.seed)
            self.train_stage(-1, teacher, None, s.teacher_stage, resume_state)
            torch.set_rng_state(generator_state)
            self.save(teacher.model.state_dict(), cached)
            source = "fine-tuned in this run"
        else:
            source = "as loaded"
        if found != "run":
            self.save(teacher.model.state_dict(), self.run_dir.teacher)
        teacher.model.to(self.device).eval()
        metrics = self.evaluate(teacher)
        if not any(r.get("kind") == "teacher" for r in iter_records(self.run_dir.path / "metrics.jsonl")):
            self.run_dir.append_jsonl("metrics.jsonl", {"stage": TEACHER, "split": "dev", "step": -1, "kind": "teacher",
                                                        **metrics})
        self.progress.message(f"teacher ({source}): {self.format_metrics(metrics)}")
        return {"description": teacher.description, "params": count_parameters(teacher.model), "dev": metrics,
                "source": source}

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loaded: LoadedModel) -> dict[str, float]:
        s = self.session
        was_training = loaded.model.training
        loaded.model.eval()
        predictions = []
        size = (s.stages[0].stage.eval_batch_size if s.stages else 64)
        # Process r evaluates batches r, r + world, ...; every process gathers all of them, in order.
        for start in range(0, len(s.dev), size)[self.rank::self.world]:
            batch = collate(s.dev, list(range(start, min(start + size, len(s.dev)))), self.device)
            with self.accelerator.autocast():
                logits = self.features("student", loaded, batch, frozenset()).logits.float()
            predictions.append((start, (logits if s.task.is_regression else logits.argmax(-1)).cpu()))
        loaded.model.train(was_training)
        if self.world > 1:
            from accelerate.utils import gather_object

            predictions = sorted(gather_object(predictions), key=lambda item: item[0])
        preds = torch.cat([p for _, p in predictions]).numpy()
        labels = torch.tensor(s.dev.labels).numpy()
        metrics = self.host.first("kdframe_compute_metrics", f"metrics for task {s.task.name!r}",
                                  task=s.task, predictions=preds, labels=labels)
        return {k: float(v) for k, v in metrics.items()}

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())

    def features(self, role: str, loaded: LoadedModel, batch: dict[str, torch.Tensor], needs: frozenset[str]) -> Features:
        return extract_features(self.host, role, loaded, batch, needs)

    # -- one stage ----------------------------------------------------------------------------
    def train_stage(self, index: int, student: LoadedModel, teacher: LoadedModel | None,
                    resolved: ResolvedStage, resume_state: dict[str, Any] | None) -> dict[str, Any]:
        s = self.session
        stage = resolved.stage
        key = TEACHER if index < 0 else stage.name
        registry = self.host.registry
        needs = resolved.needs(registry) if teacher is not None else frozenset()
        ctx = stage_context(self.run_dir.path, index, resolved, s.task, student, teacher, self.device)
        model = student.model.to(self.device)
        if teacher is not None:
            teacher.model.to(self.device).eval()
        # Per-example teacher features, computed once (recipe [teacher_cache]); None when off.
        cache = open_teacher_cache(s.recipe, teacher, s.train, s.student.tokenizer, needs,
                                   lambda b: self.features("teacher", teacher, b, needs)) if teacher is not None else None
        extra = self.host.merged("kdframe_extra_parameters", ctx=ctx)
        for module in extra.values():
            module.to(self.device)
        # Prepared by accelerate so fp16 loss scaling is unscaled before clipping and overflowing steps are skipped.
        optimizer = self.accelerator.prepare_optimizer(
            adamw([model, *extra.values()], stage.weight_decay, stage.lr, self.device))
        steps_per_epoch = math.ceil(len(s.train) / stage.batch_size)
        total = stage.max_steps if stage.max_steps else stage.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(stage.schedule, stage.warmup_ratio, total))
        self.host.call("kdframe_stage_start", ctx=ctx)

        pos = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": 0, "skipped": 0, "last_eval": None}
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if resume_state is not None and "optimizer" in resume_state:
            model.load_state_dict(resume_state["model"])
            for name, module in extra.items():
                module.load_state_dict(resume_state["extra"][name])
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            weights = {k: (v[0].to(self.device), v[1].to(self.device)) for k, v in resume_state["weights"].items()}
            pos.update(resume_state["position"])
            ctx.step = pos["step"]  # plugins see the resumed step, as in an unbroken run
            self.host.call("kdframe_load_state_dict", ctx=ctx, state=resume_state["plugins"])
            checkpoint.set_rng_state(resume_state["rng"])
            self.run_dir.truncate_logs_after(key, pos["step"])
            self.progress.message(f"[{key}] resuming at step {pos['step']}/{total}")
        self.processes.broadcast_parameters([model, *extra.values()])

        def save_checkpoint() -> None:
            plugin_state = self.host.merged("kdframe_state_dict", ctx=ctx)
            self.save({
                "stage": key, "stage_index": index, "model": model.state_dict(),
                "extra": {name: module.state_dict() for name, module in extra.items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "weights": {k: [w[0].cpu(), w[1].cpu()] for k, w in weights.items()},
                "position": dict(pos), "plugins": plugin_state, "rng": checkpoint.rng_state(),
                "summaries": self.stage_summaries,
            }, self.run_dir.checkpoint)

        def run_eval() -> None:
            metrics = self.evaluate(student)
            value = metrics[s.task.main_metric]
            self.run_dir.append_jsonl("metrics.jsonl", {"stage": key, "split": "dev", "step": pos["step"], **metrics})
            self.host.call("kdframe_eval_end", ctx=ctx, metrics=metrics)
            pos["last_eval"] = metrics
            if pos["best"] is None or value > pos["best"][s.task.main_metric]:
                pos["best"], pos["best_step"] = metrics, pos["step"]
                self.save(model.state_dict(), self.run_dir.best(key))

        label = f"{key} ({student.description.split(':')[0]})" if index < 0 else key
        self.progress.start(label, total, pos["step"])
        started = time.monotonic()
        first_step = pos["step"]
        while pos["step"] < total:
            order = torch.randperm(len(s.train), generator=torch.Generator().manual_seed(
                s.recipe.seed * 100_003 + (index + 1) * 1_009 + pos["epoch"])).tolist()
            for b in range(pos["batch"], steps_per_epoch):
                if pos["step"] >= total:
                    break
                indices = order[b * stage.batch_size:(b + 1) * stage.batch_size]
                # Data parallel: every process draws the same global batch and takes rank::world of it,
                # padded to the global batch's longest example (losses that count padding then add up
                # to the 1-process loss); an empty share runs one example with weight 0 to join in.
                mine = indices[self.rank::self.world]
                share = len(mine) / len(indices)
                mine = mine or indices[:1]
                length = max(len(s.train.input_ids[i]) for i in indices)
                batch = collate(s.train, mine, self.device, length)
                record = self.train_step(ctx, student, teacher, resolved, needs, batch, weights, optimizer, scheduler,
                                         [model, *extra.values()], pos, mine, cache, share)
                pos["step"] += 1
                pos["batch"] = b + 1
                step = pos["step"]
                ctx.step = step
                flows, used = record.pop("_flows"), record.pop("_weights")
                if step % stage.log_every == 0 or step == total:
                    self.run_dir.append_jsonl("metrics.jsonl", {"stage": key, "step": step, **record})
                    self.log_layer_weights(key, step, flows, used)
                self.host.call("kdframe_step_end", ctx=ctx, record=record)
                evaluated = stage.eval_every and step % stage.eval_every == 0
                if evaluated:
                    run_eval()
                last = pos["step"] >= total
                end_of_epoch = pos["batch"] == steps_per_epoch
                if not evaluated and (last or (stage.eval_every == 0 and end_of_epoch)):
                    run_eval()
                    evaluated = True
                if end_of_epoch:
                    pos["epoch"] += 1
                    pos["batch"] = 0
                # Ctrl-C reaches the processes at different moments: they agree here and stop after the same step.
                stop = self.processes.any_process(self.stop_requested)
                if evaluated or (stage.checkpoint_every and step % stage.checkpoint_every == 0) or stop:
                    save_checkpoint()
                info = "skipped (non-finite)" if record.get("skipped") else f"loss {record['loss']:.4f}"
                if pos["last_eval"]:
                    info += f" dev {s.task.main_metric} {pos['last_eval'][s.task.main_metric]:.4f}"
                self.progress.update(step, info, stage.log_every)
                if stop:
                    # the same --set and -p options, or the resolved recipe differs and resume refuses it
                    again = ["kdframe", "run", str(s.recipe_path), "--resume", str(self.run_dir.path)]
                    again += [arg for value in self.options.get("overrides") or [] for arg in ("--set", value)]
                    again += [arg for value in self.options.get("plugins") or [] for arg in ("-p", value)]
                    raise Interrupted(f"interrupted at {key} step {step}; checkpoint written. Resume with:"
                                      f" {shlex.join(again)}")
                if end_of_epoch:
                    break
        self.progress.stop()
        wall = time.monotonic() - started
        final = pos["last_eval"] or self.evaluate(student)
        selected = "last"
        self.accelerator.wait_for_everyone()  # the main process has written best-*.pt
        if stage.select == "best" and pos["best"] is not None and self.run_dir.best(key).exists():
            model.load_state_dict(checkpoint.load(self.run_dir.best(key)))
            selected = f"best (step {pos['best_step']})"
        self.host.call("kdframe_stage_end", ctx=ctx)
        steps = pos["step"] - first_step
        stage_summary = {"steps": pos["step"], "wall_time_s": round(wall, 2),
                         "steps_per_s": round(steps / wall, 3) if wall else None, "best": pos["best"],
                         "best_step": pos["best_step"], "final": final, "selected": selected,
                         "skipped_steps": pos["skipped"],
                         **({"teacher_cache": cache.stats()} if cache is not None else {})}
        if index >= 0:
            # The next stage starts from this model with fresh optimizer state.
            self.stage_summaries[key] = stage_summary
            self.save({"stage": None, "stage_index": index + 1, "model": model.state_dict(),
                       "summaries": self.stage_summaries}, self.run_dir.checkpoint)
        self.progress.message(f"[{key}] done: {self.format_metrics(final)} ({selected}); {steps} steps in {wall:.1f}s")
        return stage_summary

    def train_step(self, ctx: StageContext, student: LoadedModel, teacher: LoadedModel | None,
                   resolved: ResolvedStage, needs: frozenset[str], batch: dict[str, torch.Tensor],
                   weights: dict[str, tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer,
                   scheduler: Any, modules: list[torch.nn.Module], pos: dict[str, Any],
                   indices: list[int] | None = None, cache: TeacherCache | None = None,
                   share: float = 1.0) -> dict[str, Any]:
        """One optimizer step on this process's ``share`` of the global batch (1.0 in one process)."""
        student.model.train()
        with self.accelerator.autocast():
            teacher_features = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_features = (cache.features(indices, batch) if cache is not None
                                        else self.features("teacher", teacher, batch, needs))
            student_features = self.features("student", student, batch, needs)
            costs = self.host.merged("kdframe_layer_costs", student=student_features, teacher=teacher_features,
                                     ctx=ctx) if teacher is not None else {}
            shared = self.processes.shared_costs(costs, share)
            flows = {}
            used = {}
            for kind, cost in shared.items():
                if kind not in weights:  # first step of the stage: uniform (not built on every step)
                    weights[kind] = uniform_weights(cost.shape[0], cost.shape[1], cost.device)
                used[kind] = weights[kind]
                flows[kind] = self.host.first("kdframe_layer_mapping", f"mapping {ctx.mapping.name if ctx.mapping else '(none)'!r} for cost {kind!r}",
                                              kind=kind, cost=cost, weights=used[kind], ctx=ctx)
                check_flow(self.host, ctx, kind, flows[kind], cost)
            if ctx.weighting is not None and costs:
                weights.update(self.host.first("kdframe_update_layer_weights", f"weighting {ctx.weighting.name!r}",
                                               flows=flows, costs=shared, weights=used, ctx=ctx))
            terms = self.host.merged("kdframe_loss_terms", student=student_features, teacher=teacher_features,
                                     costs=costs, flows=flows, batch=batch, ctx=ctx)
        missing = sorted(set(resolved.losses) - set(terms))
        if missing:
            raise PluginError(f"no plugin computed the loss term(s) {', '.join(missing)}")
        loss = sum(resolved.losses[name].weight * terms[name].float() for name in resolved.losses)
        # The global batch's loss and terms (shares summed over processes): logged, and checked here so
        # that every process takes the same branch (a non-finite value on one is non-finite in the sum).
        names = list(resolved.losses)
        scalars = [t.detach().float().reshape(()) for t in (loss, *(terms[n] for n in names))]
        values = self.processes.reduce_sum(torch.stack(scalars) * share).tolist()
        bad = [f"loss term {name!r} = {value}" for name, value in zip(names, values[1:]) if not math.isfinite(value)]
        # the layer weights come from the shared costs: the same on every process
        bad += [f"layer weights of {kind!r}" for kind, (ws, wt) in weights.items()
                if not (torch.isfinite(ws).all() and torch.isfinite(wt).all())]
        step = pos["step"] + 1
        if bad:
            if ctx.stage.nonfinite == "stop":
                raise RunFailed(f"stage {ctx.stage.name!r} step {step}: non-finite {', '.join(bad)}; the last good"
                                f" checkpoint is {self.run_dir.checkpoint} (set nonfinite = \"skip\" to skip such steps)")
            weights.update(used)  # discard a non-finite weight update with the step
            optimizer.zero_grad(set_to_none=True)
            pos["skipped"] += 1
            return {"loss": None, "skipped": True, "lr": scheduler.get_last_lr()[0], "_flows": flows, "_weights": used}
        self.accelerator.backward(loss * share)
        self.processes.sum_gradients(modules)
        if ctx.stage.grad_clip:
            self.accelerator.clip_grad_norm_([p for m in modules for p in m.parameters()], ctx.stage.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"loss": values[0], "lr": scheduler.get_last_lr()[0]}
        record.update(zip(names, values[1:]))
        record["_flows"], record["_weights"] = flows, used
        return record

    def log_layer_weights(self, key: str, step: int, flows: dict[str, torch.Tensor],
                          weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for kind, flow in flows.items():
            ws, wt = weights[kind]
            self.run_dir.append_jsonl("layer_weights.jsonl", {
                "stage": key, "step": step, "kind": kind, "student": ws.float().cpu().tolist(),
                "teacher": wt.float().cpu().tolist(), "flow": flow.detach().float().cpu().tolist()})


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def start_run(recipe_path: str, overrides: list[str], plugin_args: list[str], out: str | None,
              resume: str | None, progress: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    session = prepare(recipe_path, overrides, plugin_args)
    plan(session)  # what only shows with models loaded fails here: before a run directory or teacher training
    text = session.resolved_toml()
    trainer = Trainer(session, None, Progress(progress), options)  # joins the other processes, if launched so
    if trainer.world > 1 and not (out or resume):
        raise KdframeError(f"a run of {trainer.world} processes needs --out DIR (or --resume DIR):"
                           " every process must use the same run directory")
    if resume:
        run_dir = RunDir.open_for_resume(Path(resume), text)
    else:
        path = Path(out) if out else Path("runs") / f"{session.recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        # The main process creates the directory; the others take its outcome (and write nothing).
        problem = None
        if trainer.is_main:
            try:
                RunDir.create(path, text)
            except KdframeError as exc:
                problem = str(exc)
        if problem := trainer.processes.from_main(problem):
            raise KdframeError(problem)
        run_dir = RunDir(path)
    run_dir.writes = trainer.is_main
    trainer.run_dir = run_dir
    if trainer.is_main:
        trainer.progress.status_file = run_dir.path / PROGRESS
    run_dir.write_env(session.recipe.seed, str(trainer.device),
                      [attrs.asdict(info) for info in session.host.infos])
    trainer.progress.message(f"run directory: {run_dir.path.resolve()}")
    return trainer.run(resume=bool(resume))


def export(run_path: str, out_dir: str, plugin_args: list[str] = ()) -> str:
    run_dir = Path(run_path)
    recipe_file = run_dir / "recipe.resolved.toml"
    weights = run_dir / "student.pt"
    if not recipe_file.exists() or not weights.exists():
        raise KdframeError(f"{run_dir} holds no finished run (needs recipe.resolved.toml and student.pt)")
    session = prepare(recipe_file, [], plugin_args, load_data=False)
    session.student.model.load_state_dict(checkpoint.load(weights))
    return session.host.first("kdframe_export_model", "model export", loaded=session.student, out_dir=out_dir)


def plan(session: Session, examples: int = 4) -> list[dict[str, Any]]:
    """Dry-run the first step of every stage on a few dev examples, without training.

    This catches what only shows once models are loaded (layer counts a mapping cannot handle,
    head counts that cannot be compared, a plugin returning a wrong shape) before any training,
    and gives ``kdframe validate`` the initial mapping to print.
    """
    s = session
    device = torch.device("cpu")
    rng = torch.get_rng_state()
    batch = collate(s.dev, list(range(min(examples, len(s.dev)))), device)
    result = []
    for index, resolved in enumerate(s.stages):
        teacher = s.teacher if resolved.needs_teacher(s.host.registry) else None
        needs = resolved.needs(s.host.registry) if teacher else frozenset()
        ctx = stage_context(None, index, resolved, s.task, s.student, teacher, device)
        s.host.merged("kdframe_extra_parameters", ctx=ctx)
        s.host.call("kdframe_stage_start", ctx=ctx)
        entry: dict[str, Any] = {"stage": resolved.stage.name, "needs": sorted(needs), "student_layers": ctx.student_layers,
                                 "teacher_layers": ctx.teacher_layers, "losses": {k: v.weight for k, v in resolved.losses.items()},
                                 "mapping": resolved.mapping.name if resolved.mapping else None,
                                 "weighting": resolved.weighting.name if resolved.weighting else None, "flows": {}}
        if teacher is not None:
            with torch.no_grad():
                t = extract_features(s.host, "teacher", teacher, batch, needs)
                st = extract_features(s.host, "student", s.student, batch, needs)
                costs = s.host.merged("kdframe_layer_costs", student=st, teacher=t, ctx=ctx)
                flows = {}
                for kind, cost in costs.items():
                    flows[kind] = s.host.first("kdframe_layer_mapping", f"mapping for cost {kind!r}", kind=kind, cost=cost,
                                               weights=uniform_weights(cost.shape[0], cost.shape[1], cost.device), ctx=ctx)
                    check_flow(s.host, ctx, kind, flows[kind], cost)
                    entry["flows"][kind] = flows[kind].float().tolist()
                terms = s.host.merged("kdframe_loss_terms", student=st, teacher=t, costs=costs, flows=flows,
                                      batch=batch, ctx=ctx)
                missing = sorted(set(resolved.losses) - set(terms))
                if missing:
                    raise PluginError(f"stages[{index}]: no plugin computes the loss term(s) {', '.join(missing)}")
        result.append(entry)
    torch.set_rng_state(rng)
    return result
