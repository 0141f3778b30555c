"""The training loop: the teacher's fine-tuning (or its cached copy), then each distillation stage.

Read top to bottom: ``Trainer.run`` prepares the teacher, then runs the stages in order;
``Trainer.train_stage`` is the step loop of one stage, which calls ``kdframe.step.train_step``,
logs, evaluates, checkpoints and stops cleanly on Ctrl-C. Everything it reaches of a method goes
through hooks; the loop's own state is typed (``kdframe.checkpoint``).
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from kdframe import checkpoint
from kdframe.caches import mark_used, teacher_path
from kdframe.checkpoint import Checkpoint, StageProgress, StageState
from kdframe.errors import Interrupted, RunFailed
from kdframe.batches import collate, epoch_order
from kdframe.evaluation import evaluate
from kdframe.fileio import atomic_link, iter_jsonl, read_json
from kdframe.invocation import kdframe_command
from kdframe.optim import Optimization
from kdframe.parallel import Processes
from kdframe.progress import Progress
from kdframe.recipe import ResolvedStage
from kdframe.rundir import LAYER_WEIGHTS, METRICS, TEACHER, TEACHER_SOURCE, RunDir
from kdframe.session import Session
from kdframe.step import DistillStep, StepRecord, stage_context, train_step
from kdframe.teacher_cache import open_teacher_cache
from kdframe.tracking import Trackers
from kdframe.types import Control, LoadedModel


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (what schedulers, Ray, Kubernetes and ``timeout`` send) sets a
    flag; the loop finishes its step, checkpoints and stops. A second signal aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, progress: Progress, world: int):
        self.progress = progress
        self.world = world
        self.signal: int | None = None  # the first one received
        self.first_at: float | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGINT)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def __call__(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.first_at is not None:
            if self.world > 1 and now - self.first_at < 2.0:
                return  # torchrun forwards the terminal's Ctrl-C to its workers: one press, two signals
            raise KeyboardInterrupt
        self.first_at, self.signal = now, signum
        self.progress.message(f"{signal.Signals(signum).name}: finishing the current step and writing a checkpoint"
                              " (a second signal aborts)")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


class Trainer:
    def __init__(self, session: Session, run_dir: RunDir | None, progress: Progress,
                 options: dict[str, Any] | None = None):
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
        self.stop = StopRequest(self.progress, self.world)
        self.stage_summaries: dict[str, Any] = {}
        self.trackers = Trackers()  # the recipe's [tracking], opened once the run directory is known

    def save(self, obj: Any, path: Path) -> None:
        """Only the main process writes files; the others hold the same state. checkpoint.pt keeps
        its previous generation; a file that cannot be written (no space, a size limit) stops the
        run with one line naming it, the last checkpoint intact."""
        if not self.is_main:
            return
        try:
            (checkpoint.save_generation if path == self.run_dir.checkpoint else checkpoint.save)(obj, path)
        except OSError as exc:
            intact = checkpoint.has_checkpoint(self.run_dir.checkpoint)
            raise RunFailed(f"cannot write {path}: {exc.strerror or exc}"
                            + (f"; the last checkpoint ({self.run_dir.checkpoint}) is intact: once there is room,"
                               f" resume with {self.resume_hint()}" if intact else "")) from None

    def track(self, stage: str, kind: str, step: int, values: dict[str, Any]) -> None:
        """``values`` to the experiment trackers, as ``STAGE/KIND/NAME``."""
        self.trackers.log({f"{stage}/{kind}/{name}": value for name, value in values.items()}, step)

    def evaluate(self, loaded: LoadedModel, batch_size: int) -> dict[str, float]:
        return evaluate(self.host, self.session.dev, loaded, batch_size, self.device, self.processes,
                        self.accelerator.autocast)

    # -- the run --------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """The run's time so far: up to its last checkpoint in earlier sessions, plus this one."""
        return self.elapsed_before + time.monotonic() - self.started

    def run(self, resume: bool) -> dict[str, Any]:
        s = self.session
        checkpoint.seed_everything(s.recipe.seed)
        state, note = (checkpoint.load_checkpoint(self.run_dir.checkpoint)
                       if resume and checkpoint.has_checkpoint(self.run_dir.checkpoint) else (None, None))
        if note:
            self.progress.message(note)
        self.started, self.elapsed_before = time.monotonic(), state.elapsed_s if state is not None else 0.0
        previous = {signum: signal.signal(signum, self.stop) for signum in StopRequest.SIGNALS}
        try:
            self.host.run_start(self)
            # Summaries of stages finished before an interruption come back from the checkpoint.
            self.stage_summaries = dict(state.summaries) if state is not None else {}
            summary: dict[str, Any] = {"task": s.task.name, "seed": s.recipe.seed, "stages": self.stage_summaries}
            if s.needs_teacher:
                summary["teacher"] = self.prepare_teacher(self.resumed(state, TEACHER))
            if state is not None and self.resumed(state, TEACHER) is None:
                s.student.model.load_state_dict(state.model)
            for index, resolved in enumerate(s.stages):
                if state is not None and state.stage_index > index:
                    continue  # finished before the interruption; its result is in the loaded model
                summary["stages"][resolved.stage.name] = self.train_stage(
                    index, s.student, s.teacher if s.needs_teacher else None, resolved,
                    self.resumed(state, resolved.stage.name))
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
            summary["wall_time_s"] = round(self.elapsed(), 2)
            self.save(s.student.model.state_dict(), self.run_dir.path / "student.pt")
            self.run_dir.write_json("summary.json", summary)
            if self.is_main:  # the run is complete: its mid-stage generation is of no further use
                checkpoint.previous(self.run_dir.checkpoint).unlink(missing_ok=True)
            for which in ("best", "final"):
                self.track("summary", f"student_{which}", 0, summary["student"][which] or {})
            self.host.run_end(self, summary)
            return summary
        except BaseException as exc:
            self.host.on_exception(self, exc)
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.progress.stop()
            self.trackers.finish()

    @staticmethod
    def resumed(state: Checkpoint | None, key: str) -> Checkpoint | None:
        """``state`` if it was written in the middle of stage ``key``."""
        return state if state is not None and state.stage is not None and state.stage.key == key else None

    # -- the teacher ----------------------------------------------------------------------------
    def prepare_teacher(self, resume: Checkpoint | None) -> dict[str, Any]:
        """Fine-tune the teacher (or take it from this run or the shared cache); evaluate it."""
        s = self.session
        teacher = s.teacher
        # Only a fine-tuned teacher is cached (its key reads the data files to fingerprint them).
        cached = teacher_path(s.recipe, self.host.data_fingerprint(s.recipe.data)) if s.teacher_stage else None
        # The main process looks at the files: another process must not see one it has just written.
        found = self.processes.from_main("run" if self.run_dir.teacher.exists()
                                         else "cache" if cached is not None and cached.exists() else None)
        if found == "run":  # a resumed run: the teacher it had, and where that came from
            teacher.model.load_state_dict(checkpoint.load(self.run_dir.teacher))
            recorded = read_json(self.run_dir.path / TEACHER_SOURCE)
            source = recorded.get("source", "this run") if isinstance(recorded, dict) else "this run"
        elif found == "cache":
            teacher.model.load_state_dict(checkpoint.load(cached))
            mark_used(cached)
            source = f"cache {cached}"
        elif cached is not None:
            generator_state = torch.get_rng_state()
            torch.manual_seed(s.recipe.teacher.seed)
            self.train_stage(-1, teacher, None, s.teacher_stage, resume)
            torch.set_rng_state(generator_state)
            self.save(teacher.model.state_dict(), cached)
            source = "fine-tuned in this run"
        else:
            source = "as loaded"
        if found != "run":
            self.keep_teacher(teacher, cached)
            self.run_dir.write_json(TEACHER_SOURCE, {"source": source})
        teacher.model.to(self.device).eval()
        metrics = self.evaluate(teacher, (s.teacher_stage or s.stages[0]).stage.eval_batch_size)
        if not any(r.get("kind") == "teacher" for r in iter_jsonl(self.run_dir.path / METRICS)):
            self.run_dir.append_jsonl(METRICS, {"stage": TEACHER, "split": "dev", "step": -1, "kind": "teacher",
                                                **metrics})
        self.track(TEACHER, "selected", 0, metrics)
        self.progress.message(f"teacher ({source}): {format_metrics(metrics)}")
        return {"description": teacher.description, "params": count_parameters(teacher.model), "dev": metrics,
                "source": source}

    def keep_teacher(self, teacher: LoadedModel, cached: Path | None) -> None:
        """The run's teacher.pt. A cached teacher is linked, not copied (a grid of cells keeps one
        copy on disk), and made read-only: a write into either name would change both."""
        if not self.is_main:
            return
        if cached is not None and atomic_link(cached, self.run_dir.teacher):
            cached.chmod(0o444)
        else:
            self.save(teacher.model.state_dict(), self.run_dir.teacher)

    # -- one stage ------------------------------------------------------------------------------
    def train_stage(self, index: int, student: LoadedModel, teacher: LoadedModel | None, resolved: ResolvedStage,
                    resume: Checkpoint | None) -> dict[str, Any]:
        """Train ``student`` (the teacher itself at index -1) through one stage; ``resume`` is a
        checkpoint written in the middle of this stage."""
        s = self.session
        stage = resolved.stage
        key = TEACHER if index < 0 else stage.name
        needs = resolved.needs(self.host.registry) if teacher is not None else frozenset()
        ctx = stage_context(self.run_dir.path, index, resolved, s.task, student, teacher, self.device)
        model = student.model.to(self.device)
        if teacher is not None:
            teacher.model.to(self.device).eval()
        step = DistillStep(self.host, ctx, student, teacher, needs)
        # Per-example teacher features, computed once (recipe [teacher_cache]); None when off.
        cache = open_teacher_cache(s.recipe, teacher, s.train, s.student.tokenizer, needs,
                                   lambda b: step.features("teacher", teacher, b)) if teacher is not None else None
        extra = self.host.extra_parameters(ctx)
        for module in extra.values():
            module.to(self.device)
        steps_per_epoch = math.ceil(len(s.train) / stage.batch_size)
        total = stage.max_steps if stage.max_steps else stage.epochs * steps_per_epoch
        optimization = Optimization([model, *extra.values()], stage, total, self.accelerator, self.device)
        self.host.stage_start(ctx)

        progress = StageProgress()
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if resume is not None:
            state = resume.stage
            model.load_state_dict(resume.model)
            for name, module in extra.items():
                module.load_state_dict(state.extra[name])
            optimization.load_state(state.optimizer, state.scheduler)
            weights = {k: (v[0].to(self.device), v[1].to(self.device)) for k, v in state.weights.items()}
            progress = attrs.evolve(state.progress)
            ctx.step = progress.step  # plugins see the resumed step, as in an unbroken run
            self.host.load_state_dict(ctx, state.plugins)
            checkpoint.set_rng_state(state.rng)
            self.run_dir.truncate_logs_after(key, progress.step)
            self.progress.message(f"[{key}] resuming at step {progress.step}/{total}")
        self.processes.broadcast_parameters(optimization.modules)

        def save_checkpoint() -> None:
            optimizer_state, scheduler_state = optimization.state()
            progress.elapsed_s = elapsed_before + time.monotonic() - started
            self.save(Checkpoint(index, model.state_dict(), self.stage_summaries, StageState(
                key, index, {name: module.state_dict() for name, module in extra.items()}, optimizer_state,
                scheduler_state, {k: [w[0].cpu(), w[1].cpu()] for k, w in weights.items()},
                progress, self.host.state_dict(ctx), checkpoint.rng_state()), self.elapsed()).to_file(),
                self.run_dir.checkpoint)

        def run_eval() -> Control:
            metrics = self.evaluate(student, stage.eval_batch_size)
            value = metrics[s.task.main_metric]
            self.run_dir.append_jsonl(METRICS, {"stage": key, "split": "dev", "step": progress.step, **metrics})
            self.track(key, "dev", progress.step, metrics)
            progress.last_eval = metrics
            if progress.best is None or value > progress.best[s.task.main_metric]:
                progress.best, progress.best_step = metrics, progress.step
                self.save(model.state_dict(), self.run_dir.best(key))
            return self.host.eval_end(ctx, metrics)

        label = f"{key} ({student.description.split(':')[0]})" if index < 0 else key
        self.progress.start(label, total, progress.step)
        started, elapsed_before = time.monotonic(), progress.elapsed_s  # a resumed stage counts its earlier time
        while progress.step < total and not progress.stopped:
            order = epoch_order(len(s.train), s.recipe.seed, index, progress.epoch)
            for b in range(progress.batch, steps_per_epoch):
                if progress.step >= total:
                    break
                indices = order[b * stage.batch_size:(b + 1) * stage.batch_size].tolist()
                # Data parallel: every process draws the same global batch and takes rank::world of it,
                # padded to the global batch's longest example (losses that count padding then add up
                # to the 1-process loss); an empty share runs one example with weight 0 to join in.
                mine = indices[self.rank::self.world]
                share = len(mine) / len(indices)
                mine = mine or indices[:1]
                length = int(s.train.lengths()[indices].max())
                batch = collate(s.train, mine, self.device, length)
                record = train_step(step, optimization, self.processes, batch, weights, share=share,
                                    teacher_features=(lambda b, rows=mine: cache.features(rows, b)) if cache else None,
                                    autocast=self.accelerator.autocast)
                if record.nonfinite and stage.nonfinite == "stop":
                    raise RunFailed(f"stage {stage.name!r} step {progress.step + 1}: non-finite"
                                    f" {', '.join(record.nonfinite)}; the last good checkpoint is"
                                    f" {self.run_dir.checkpoint} (set nonfinite = \"skip\" to skip such steps)")
                weights = record.next_weights
                progress.skipped += bool(record.nonfinite)
                progress.step += 1
                progress.batch = b + 1
                ctx.step = progress.step
                log = record.log()
                if progress.step % stage.log_every == 0 or progress.step == total:
                    self.run_dir.append_jsonl(METRICS, {"stage": key, "step": progress.step, **log})
                    self.track(key, "train", progress.step, log)
                    self.log_layer_weights(key, progress.step, record)
                control = self.host.step_end(ctx, log)
                end_of_epoch = progress.batch == steps_per_epoch
                evaluated = (control.evaluate or control.stop or progress.step >= total
                             or (stage.eval_every and progress.step % stage.eval_every == 0)
                             or (stage.eval_every == 0 and end_of_epoch))
                if evaluated:
                    control |= run_eval()
                if end_of_epoch:
                    progress.epoch += 1
                    progress.batch = 0
                # A plugin's stop ends the stage here (the checkpoint records it, so a resume does too).
                if self.processes.any_process(control.stop):
                    progress.stopped = control.reason or "a plugin asked to stop"
                    self.progress.message(f"[{key}] stopping at step {progress.step}: {progress.stopped}")
                # Ctrl-C reaches the processes at different moments: they agree here and stop after the same step.
                stop = self.processes.any_process(self.stop.requested)
                if (evaluated or control.save or stop or progress.stopped
                        or (stage.checkpoint_every and progress.step % stage.checkpoint_every == 0)):
                    save_checkpoint()
                info = "skipped (non-finite)" if record.nonfinite else f"loss {record.loss:.4f}"
                if progress.last_eval:
                    info += f" dev {s.task.main_metric} {progress.last_eval[s.task.main_metric]:.4f}"
                self.progress.update(progress.step, info, stage.log_every)
                if stop:
                    raise Interrupted(f"interrupted at {key} step {progress.step}; checkpoint written."
                                      f" Resume with: {self.resume_hint()}", self.stop.exit_code)
                if end_of_epoch or progress.stopped:
                    break
        self.progress.stop()
        wall = elapsed_before + time.monotonic() - started
        final = progress.last_eval or self.evaluate(student, stage.eval_batch_size)
        selected = "last"
        self.accelerator.wait_for_everyone()  # the main process has written best-*.pt
        if stage.select == "best" and progress.best is not None and self.run_dir.best(key).exists():
            model.load_state_dict(checkpoint.load(self.run_dir.best(key)))
            selected = f"best (step {progress.best_step})"
        self.host.stage_end(ctx)
        stage_summary = {"steps": progress.step, "wall_time_s": round(wall, 2),
                         "steps_per_s": round(progress.step / wall, 3) if wall else None, "best": progress.best,
                         "best_step": progress.best_step, "final": final, "selected": selected,
                         "skipped_steps": progress.skipped, **({"stopped": progress.stopped} if progress.stopped else {}),
                         **({"teacher_cache": cache.stats()} if cache is not None else {})}
        if index >= 0:
            # The next stage starts from this model with fresh optimizer state.
            self.stage_summaries[key] = stage_summary
            self.save(Checkpoint(index + 1, model.state_dict(), self.stage_summaries, elapsed_s=self.elapsed()).to_file(),
                      self.run_dir.checkpoint)
        self.progress.message(f"[{key}] done: {format_metrics(final)} ({selected}); {progress.step} steps in {wall:.1f}s")
        return stage_summary

    def resume_hint(self) -> str:
        """What continues this run: the same command with the same --set and -p options (or the
        resolved recipe differs and resume refuses it); from Python, the same call."""
        if self.session.recipe_path is None:
            return f"kdframe.run(the same recipe, models and datasets, resume={str(self.run_dir.path)!r})"
        again = [*kdframe_command(), "run", str(self.session.recipe_path), "--resume", str(self.run_dir.path)]
        again += [arg for value in self.options.get("overrides") or [] for arg in ("--set", value)]
        again += [arg for value in self.options.get("plugins") or [] for arg in ("-p", value)]
        return shlex.join(again)

    def log_layer_weights(self, key: str, step: int, record: StepRecord) -> None:
        for kind, flow in record.flows.items():
            ws, wt = (w.float().cpu().tolist() for w in record.weights[kind])
            self.run_dir.append_jsonl(LAYER_WEIGHTS, {
                "stage": key, "step": step, "kind": kind, "student": ws, "teacher": wt,
                "flow": flow.detach().float().cpu().tolist()})
            self.track(key, f"layer_weights/{kind}", step,
                       {**{f"student_{i}": w for i, w in enumerate(ws, 1)},
                        **{f"teacher_{j}": w for j, w in enumerate(wt, 1)}})
