"""Step time and peak memory per distillation strategy, split into the phases of a training step.

Every strategy runs on the same teacher, the same student weights (a copy per strategy, each with
its own optimizer, W_h and layer weights, as a run would have) and the same synthetic batches,
built through the engine's own pieces: ``kdframe.engine.prepare`` loads the recipe's models,
``kdframe.recipe.load_recipe`` with a ``--set stages[0]={...}`` override and ``resolve_recipe``
give each strategy's stage, and ``stage_context`` / ``param_groups`` / ``schedule`` /
``kdframe_extra_parameters`` / ``kdframe_stage_start`` set it up as ``Trainer.train_stage`` does.

``timed_step`` below is a line-by-line copy of ``kdframe.engine.Trainer.train_step`` with clock
reads between the hook calls (nothing else changed). Two checks keep it honest: (1) on the tiny
models it is run against the engine's own ``Trainer.train_step`` from identical state and must
give the same loss and the same updated weights; (2) the engine's ``train_step`` itself is timed
in the same interleaved rounds for one-to-one and emd+cost-attention, so its total can be compared
with the copy's.

Phases: teacher_forward (no_grad, capture when the strategy needs attention), student_forward,
costs (kdframe_layer_costs), transport (kdframe_layer_mapping for every cost kind), weight_update
(kdframe_update_layer_weights), loss_terms (kdframe_loss_terms, the weighted sum, the loss values
read to Python and the finiteness checks), backward (the student's backward *and* the backward
through the cost matrices: autograd runs them as one pass), optimizer (grad clip, AdamW step,
scheduler, zero_grad), record (building the step's record).

Memory: peak resident set size (RSS), measured in a fresh subprocess per strategy (tracemalloc
does not see torch's allocations). ``first_step_peak_mb`` is the peak RSS during the first step
minus the RSS before it (it includes AdamW's state, allocated at the first step);
``step_peak_mb`` is the peak during later steps minus the RSS before them (the activations and
temporaries of one step). Peaks are reset through /proc/self/clear_refs (Linux); the kernel's
VmHWM is read from /proc/self/status.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

# -- what is measured -------------------------------------------------------------------------

CONFIGS = {
    # smoke_tiny: BERT 4 layers, hidden 32, 4 heads (positions up to 64) -> teacher layers [1, 3]
    "tiny": {"recipe": "recipes/smoke_tiny.toml", "lengths": [64], "batch": 32},
    # glue_base: MiniLM-L6 (all-MiniLM-L6-v2, 6 layers, hidden 384, 12 heads) -> layers [0, 2, 4]
    "minilm": {"recipe": "recipes/emd_glue.toml", "lengths": [64, 128], "batch": 32},
}

LAYER_LOSSES = "losses = { att = 0.005, hid = 0.005, emb = 0.005, pred = { weight = 1.0, temperature = 1.0 } }"
STRATEGIES = {  # the body of stages[0], as the *_glue recipes and their ablations write it
    "finetune": "losses = { hard = 1.0 }",
    "kd": "losses = { pred = { weight = 1.0, temperature = 1.0 } }",
    "one-to-one": f'mapping = {{ strategy = "one-to-one" }}, {LAYER_LOSSES}',
    "uniform": f'mapping = {{ strategy = "uniform" }}, {LAYER_LOSSES}',
    "emd": f'mapping = {{ strategy = "emd" }}, weighting = {{ strategy = "uniform" }}, {LAYER_LOSSES}',
    "emd+ca": (f'mapping = {{ strategy = "emd" }}, weighting = {{ strategy = "cost-attention", normalize = "sum" }},'
               f' {LAYER_LOSSES}'),
    "pkd": ('mapping = { strategy = "pkd", choice = "skip" },'
            ' losses = { hard = 0.5, pred = { weight = 0.5, temperature = 5.0 }, pt = 100.0 }'),
}
ENGINE_CHECKED = ("one-to-one", "emd+ca")  # also timed through the engine's own train_step
PHASES = ("teacher_forward", "student_forward", "costs", "transport", "weight_update", "loss_terms",
          "backward", "optimizer", "record")


def stage_override(strategy: str, batch: int) -> str:
    return f'stages[0]={{ name = "bench", batch_size = {batch}, lr = 2e-5, eval_every = 0, {STRATEGIES[strategy]} }}'


# -- setup through the engine's pieces ------------------------------------------------------------

def load_session(config: str):
    import torch

    from kdframe.engine import Trainer, prepare

    torch.manual_seed(0)
    session = prepare(C.ROOT / CONFIGS[config]["recipe"], [], load_data=False)
    trainer = Trainer(session, run_dir=None, progress=None)  # train_step reads neither
    return session, trainer


class Arm:
    """One strategy set up as Trainer.train_stage sets up a stage."""

    def __init__(self, session, trainer, strategy: str, batch: int, student_state: Any = None):
        import attrs
        import torch

        from kdframe.engine import adamw, schedule, stage_context
        from kdframe.recipe import load_recipe, resolve_recipe

        host, registry = session.host, session.host.registry
        recipe, _ = load_recipe(session.recipe_path, [stage_override(strategy, batch)])
        stages, problems = resolve_recipe(recipe, registry)
        if problems:
            raise SystemExit(f"{strategy}: {problems}")
        self.name = strategy
        self.resolved = resolved = stages[0]
        stage = resolved.stage
        device = trainer.device
        self.teacher = session.teacher if resolved.needs_teacher(registry) else None
        self.needs = resolved.needs(registry) if self.teacher is not None else frozenset()
        model = copy.deepcopy(session.student.model)
        if student_state is not None:
            model.load_state_dict(student_state)
        self.student = attrs.evolve(session.student, model=model)
        self.ctx = stage_context(None, 0, resolved, session.task, self.student, self.teacher, device)
        model.to(device)
        if self.teacher is not None:
            self.teacher.model.to(device).eval()
        torch.manual_seed(1)  # W_h's initialisation, the same for every arm
        extra = host.merged("kdframe_extra_parameters", ctx=self.ctx)
        for module in extra.values():
            module.to(device)
        self.optimizer = trainer.accelerator.prepare_optimizer(
            adamw([model, *extra.values()], stage.weight_decay, stage.lr, device))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(stage.schedule, stage.warmup_ratio, 10**6))
        host.call("kdframe_stage_start", ctx=self.ctx)
        self.modules = [model, *extra.values()]
        self.weights: dict[str, Any] = {}
        self.pos = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": 0, "skipped": 0, "last_eval": None}

    def after_step(self, session, record: dict[str, Any]) -> None:
        """What Trainer.train_stage does around train_step on a step without eval/log/checkpoint."""
        self.pos["step"] += 1
        self.ctx.step = self.pos["step"]
        record.pop("_flows"), record.pop("_weights")
        session.host.call("kdframe_step_end", ctx=self.ctx, record=record)

    def engine_step(self, session, trainer, batch) -> dict[str, Any]:
        record = trainer.train_step(self.ctx, self.student, self.teacher, self.resolved, self.needs, batch,
                                    self.weights, self.optimizer, self.scheduler, self.modules, self.pos)
        self.after_step(session, record)
        return record


def timed_step(trainer, arm: Arm, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """kdframe.engine.Trainer.train_step, copied line by line, with clock reads between its parts
    (one process, no teacher cache: indices=None, cache=None, share=1.0).

    Keep in step with the engine: the tiny-model check in ``check_faithful`` fails when it drifts.
    """
    import torch

    from kdframe.engine import check_flow, uniform_weights
    from kdframe.errors import PluginError, RunFailed

    phases = {"wall": dict.fromkeys(PHASES, 0.0), "cpu": dict.fromkeys(PHASES, 0.0)}
    clock, whole = C.Clock(), C.Clock()

    def mark(name: str) -> None:
        wall, cpu = clock.lap()
        phases["wall"][name] += wall
        phases["cpu"][name] += cpu

    self = trainer
    ctx, student, teacher, resolved, needs = arm.ctx, arm.student, arm.teacher, arm.resolved, arm.needs
    weights, optimizer, scheduler, modules, pos = arm.weights, arm.optimizer, arm.scheduler, arm.modules, arm.pos
    indices, cache, share = None, None, 1.0
    # ---- from here: Trainer.train_step -------------------------------------------------------
    student.model.train()
    with self.accelerator.autocast():
        teacher_features = None
        if teacher is not None:
            with torch.no_grad():
                teacher_features = (cache.features(indices, batch) if cache is not None
                                    else self.features("teacher", teacher, batch, needs))
        mark("teacher_forward")
        student_features = self.features("student", student, batch, needs)
        mark("student_forward")
        costs = self.host.merged("kdframe_layer_costs", student=student_features, teacher=teacher_features,
                                 ctx=ctx) if teacher is not None else {}
        shared = self.processes.shared_costs(costs, share)
        mark("costs")
        flows = {}
        used = {}
        for kind, cost in shared.items():
            if kind not in weights:
                weights[kind] = uniform_weights(cost.shape[0], cost.shape[1], cost.device)
            used[kind] = weights[kind]
            flows[kind] = self.host.first("kdframe_layer_mapping", f"mapping {ctx.mapping.name if ctx.mapping else '(none)'!r} for cost {kind!r}",
                                          kind=kind, cost=cost, weights=used[kind], ctx=ctx)
            check_flow(self.host, ctx, kind, flows[kind], cost)
        mark("transport")
        if ctx.weighting is not None and costs:
            weights.update(self.host.first("kdframe_update_layer_weights", f"weighting {ctx.weighting.name!r}",
                                           flows=flows, costs=shared, weights=used, ctx=ctx))
        mark("weight_update")
        terms = self.host.merged("kdframe_loss_terms", student=student_features, teacher=teacher_features,
                                 costs=costs, flows=flows, batch=batch, ctx=ctx)
    missing = sorted(set(resolved.losses) - set(terms))
    if missing:
        raise PluginError(f"no plugin computed the loss term(s) {', '.join(missing)}")
    loss = sum(resolved.losses[name].weight * terms[name].float() for name in resolved.losses)
    names = list(resolved.losses)
    scalars = [t.detach().float().reshape(()) for t in (loss, *(terms[n] for n in names))]
    values = self.processes.reduce_sum(torch.stack(scalars) * share).tolist()
    bad = [f"loss term {name!r} = {value}" for name, value in zip(names, values[1:]) if not math.isfinite(value)]
    bad += [f"layer weights of {kind!r}" for kind, (ws, wt) in weights.items()
            if not (torch.isfinite(ws).all() and torch.isfinite(wt).all())]
    step = pos["step"] + 1
    mark("loss_terms")
    if bad:
        if ctx.stage.nonfinite == "stop":
            raise RunFailed(f"stage {ctx.stage.name!r} step {step}: non-finite {', '.join(bad)}")
        weights.update(used)
        optimizer.zero_grad(set_to_none=True)
        pos["skipped"] += 1
        phases["wall"]["total"], phases["cpu"]["total"] = whole.lap()
        return ({"loss": None, "skipped": True, "lr": scheduler.get_last_lr()[0], "_flows": flows,
                 "_weights": used}, phases)
    self.accelerator.backward(loss * share)
    self.processes.sum_gradients(modules)
    mark("backward")
    if ctx.stage.grad_clip:
        self.accelerator.clip_grad_norm_([p for m in modules for p in m.parameters()], ctx.stage.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    mark("optimizer")
    record = {"loss": values[0], "lr": scheduler.get_last_lr()[0]}
    record.update(zip(names, values[1:]))
    record["_flows"], record["_weights"] = flows, used
    # ---- end of the copy --------------------------------------------------------------------
    mark("record")
    phases["wall"]["total"], phases["cpu"]["total"] = whole.lap()
    return record, phases


# -- synthetic batches ----------------------------------------------------------------------------

def synthetic_batch(session, batch: int, length: int, seed: int, padded: bool = True) -> dict[str, Any]:
    """A batch as ``collate`` builds it, padded to exactly ``length``: one example has the full
    length, the others 50-100% of it (dynamic padding's shape); a [CLS] a [SEP] b [SEP] layout."""
    import torch

    tok = session.student.tokenizer
    vocab = session.student.vocab_size
    g = torch.Generator().manual_seed(seed)
    low = 1000 if vocab > 5000 else 5  # BERT vocabularies keep [unused] entries below 1000
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g) if padded else torch.full((batch,), length)
    lengths[0] = length
    ids = torch.zeros(batch, length, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths.tolist()):
        ids[row, :n] = torch.randint(low, vocab, (n,), generator=g)
        half = n // 2
        ids[row, 0], ids[row, half], ids[row, n - 1] = tok.cls_token_id, tok.sep_token_id, tok.sep_token_id
        types[row, half + 1:n] = 1
        mask[row, :n] = 1
    labels = torch.randint(0, max(2, session.task.num_labels), (batch,), generator=g)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}


# -- checks -----------------------------------------------------------------------------------------

def check_faithful(session, trainer, batch_size: int, length: int) -> dict[str, Any]:
    """timed_step vs Trainer.train_step from identical state: same loss, same updated weights."""
    import torch

    state = copy.deepcopy(session.student.model.state_dict())
    batch = synthetic_batch(session, batch_size, length, seed=123)
    out = {}
    for strategy in STRATEGIES:
        arms = [Arm(session, trainer, strategy, batch_size, state) for _ in range(2)]
        records = []
        for i, arm in enumerate(arms):
            torch.manual_seed(7)  # dropout masks
            for _ in range(2):
                record = arm.engine_step(session, trainer, batch) if i == 0 else timed_step(trainer, arm, batch)[0]
                if i == 1:
                    arm.after_step(session, record)
            records.append(record)
        diff = max((a - b).abs().max().item() for a, b in zip(arms[0].student.model.parameters(),
                                                               arms[1].student.model.parameters()))
        same = math.isclose(records[0]["loss"], records[1]["loss"], rel_tol=1e-6, abs_tol=1e-9) and diff <= 1e-6
        out[strategy] = {"engine_loss": records[0]["loss"], "copy_loss": records[1]["loss"],
                         "max_param_diff": diff, "same": same}
    return out


# -- what crosses to the host ----------------------------------------------------------------------

def trace_crossings(session, trainer, strategy: str, batch_size: int, length: int) -> dict[str, Any]:
    """Run the engine's own train_step once under a dispatch mode that records every copy with an
    explicit device (``.to(device, ...)`` / ``.cpu()``: on a GPU these are the host<->device
    transfers) and every tensor-to-Python scalar read (``.item()``, ``bool(tensor)``: a device
    sync on a GPU), with the kdframe/plugin line that asked for it. On this CPU machine source
    and target device are the same, so the call site says which way a copy goes."""
    import collections
    import traceback

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    def caller(skip: int = 3) -> str:
        for frame in reversed(traceback.extract_stack()[:-skip]):
            path = frame.filename.replace("\\", "/")
            if ("/plugins/" in path or "/kdframe/" in path) and "_python_dispatch" not in path:
                return f"{path.split('/main/')[-1]}:{frame.lineno} {frame.line}"
        return "?"

    events: collections.Counter = collections.Counter()

    class Crossings(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
                events[("copy to " + str(kwargs["device"]), tuple(args[0].shape), str(args[0].dtype), caller())] += 1
            elif func is torch.ops.aten._local_scalar_dense.default:
                events[("scalar read", tuple(args[0].shape), str(args[0].dtype), caller())] += 1
            return func(*args, **kwargs)

    arm = Arm(session, trainer, strategy, batch_size)
    batch = synthetic_batch(session, batch_size, length, seed=0)
    arm.engine_step(session, trainer, batch)  # the first step creates the layer weights
    tolist = torch.Tensor.tolist

    def traced_tolist(tensor):  # not a dispatched op; on a GPU it copies the tensor to the host
        events[("tolist (read to Python)", tuple(tensor.shape), str(tensor.dtype), caller(2))] += 1
        return tolist(tensor)

    torch.Tensor.tolist = traced_tolist
    try:
        with Crossings():
            arm.engine_step(session, trainer, batch)
    finally:
        torch.Tensor.tolist = tolist
    rows = [{"what": what, "shape": list(shape), "dtype": dtype, "where": where, "count": n}
            for (what, shape, dtype, where), n in sorted(events.items(), key=lambda kv: kv[0][3])]
    largest = max((math.prod(r["shape"]) for r in rows if r["what"].startswith("copy")), default=0)
    # a feature tensor holds more than one number per token (B, L, d) or (B, h, L, L); the
    # (B, L) attention mask that transformers copies inside the forward is input, not a feature
    return {"events": rows, "largest_copy_elements": largest,
            "features_cross": largest > batch_size * length,
            "scalar_reads": sum(r["count"] for r in rows if r["what"] in ("scalar read", "tolist (read to Python)"))}


# -- memory (one fresh process per strategy) ---------------------------------------------------------

def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def feature_megabytes(session, trainer, arm: Arm, batch) -> float:
    """Bytes of the hidden states and attention scores both models hand to the strategies."""
    import torch

    total = 0
    with torch.no_grad():
        for role, loaded in (("teacher", arm.teacher), ("student", arm.student)):
            if loaded is None:
                continue
            f = trainer.features(role, loaded, batch, arm.needs)
            for group in (f.hidden or ()), (f.attn or ()):
                total += sum(t.numel() * t.element_size() for t in group)
    return total / 2**20


def memory_child(spec: str) -> None:
    """Peak RSS of each strategy's steps, one strategy after the other in this process.

    Started with MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=0 so glibc maps every
    block of 64 KiB or more on its own and returns it on free: RSS then follows live memory, and
    what one strategy freed does not hide the next one's allocations.
    """
    import torch

    job = json.loads(spec)
    session, trainer = load_session(job["config"])
    batch = synthetic_batch(session, job["batch"], job["length"], seed=0)
    out = {}
    for strategy in job["strategies"]:
        arm = Arm(session, trainer, strategy, job["batch"])
        features_mb = feature_megabytes(session, trainer, arm, batch)
        gc.collect()
        resettable = _reset_peak()
        rss0 = _status_kb("VmRSS")
        record, _ = timed_step(trainer, arm, batch)
        arm.after_step(session, record)
        peak1 = _status_kb("VmHWM")
        del record
        gc.collect()
        _reset_peak()
        rss1 = _status_kb("VmRSS")
        for _ in range(job["steps"]):
            record, _ = timed_step(trainer, arm, batch)
            arm.after_step(session, record)
        peak2 = _status_kb("VmHWM")
        out[strategy] = {
            "first_step_peak_mb": round((peak1 - rss0) / 1024, 1), "step_peak_mb": round((peak2 - rss1) / 1024, 1),
            "retained_after_first_step_mb": round((rss1 - rss0) / 1024, 1), "rss_before_mb": round(rss0 / 1024, 1),
            "features_mb": round(features_mb, 1), "peak_reset_ok": resettable, "loadavg": C.loadavg()}
        del arm, record
        gc.collect()
    print("MEMORY " + json.dumps(out))


def measure_memory(config: str, strategies: list[str], batch: int, length: int, steps: int) -> dict[str, Any]:
    import os

    import torch

    spec = json.dumps({"config": config, "strategies": strategies, "batch": batch, "length": length, "steps": steps})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, __file__, "--memory-child", spec, "--threads", str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=1200, cwd=C.ROOT, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    return {name: {"error": (proc.stderr or proc.stdout)[-2000:]} for name in strategies}


# -- the timing run --------------------------------------------------------------------------------

def run_config(session, trainer, config: str, length: int, rounds: int, budget_s: float,
               engine_check: bool = True) -> dict[str, Any]:
    batch_size = CONFIGS[config]["batch"]
    arms = {name: Arm(session, trainer, name, batch_size) for name in STRATEGIES}
    engine_arms = {name: Arm(session, trainer, name, batch_size) for name in (ENGINE_CHECKED if engine_check else ())}
    batches = [synthetic_batch(session, batch_size, length, seed=s) for s in range(4)]
    variants = [("copy", name) for name in arms] + [("engine", name) for name in engine_arms]
    times: dict[str, list[dict[str, dict[str, float]]]] = {f"{kind}:{name}": [] for kind, name in variants}
    loads = []

    def run_one(kind: str, name: str, batch) -> dict[str, dict[str, float]]:
        if kind == "copy":
            record, phases = timed_step(trainer, arms[name], batch)
            arms[name].after_step(session, record)
            return phases
        clock = C.Clock()
        engine_arms[name].engine_step(session, trainer, batch)
        wall, cpu = clock.lap()
        return {"wall": {"total": wall}, "cpu": {"total": cpu}}

    for kind, name in variants:  # warm-up: first steps allocate optimizer state, fill caches
        run_one(kind, name, batches[0])
    started = time.perf_counter()
    done = 0
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        batch = batches[r % len(batches)]
        loads.append(C.loadavg())
        for kind, name in order:
            times[f"{kind}:{name}"].append(run_one(kind, name, batch))
        done = r + 1
        if done >= 3 and time.perf_counter() - started > budget_s:
            break

    summary: dict[str, Any] = {"rounds": done, "loadavg_per_round": loads, "strategies": {}, "engine_check": {},
                               "ratios": {}}
    for name in arms:
        rows = times[f"copy:{name}"]
        summary["strategies"][name] = {
            clock: {p: C.quantiles([row[clock][p] for row in rows]) for p in (*PHASES, "total")}
            for clock in ("cpu", "wall")}
        summary["strategies"][name]["layer_weights_after"] = {k: [w.tolist() for w in ws]
                                                              for k, ws in arms[name].weights.items()}
    for name in engine_arms:
        summary["engine_check"][name] = {}
        for clock in ("cpu", "wall"):
            engine = C.quantiles([row[clock]["total"] for row in times[f"engine:{name}"]])
            copy_total = summary["strategies"][name][clock]["total"]
            summary["engine_check"][name][clock] = {"engine_total": engine,
                                                    "copy_over_engine": copy_total["median"] / engine["median"]}

    for clock in ("cpu", "wall"):
        def total(name: str, r: int, source: str = "copy") -> float:
            return times[f"{source}:{name}"][r][clock]["total"]

        def teacher_plain(r: int) -> float:  # the kd arm's teacher forward: no capture, logits only
            return times["copy:kd"][r][clock]["teacher_forward"]

        rr = range(done)
        summary["ratios"][clock] = {
            "emd_ca_over_one_to_one": C.quantiles([total("emd+ca", r) / total("one-to-one", r) for r in rr]),
            "emd_ca_over_one_to_one_engine": C.quantiles(
                [total("emd+ca", r, "engine") / total("one-to-one", r, "engine") for r in rr] if engine_arms else []),
            # the two steps differ only in the mapping and weighting phases (same costs, same losses):
            # one-to-one's step with its transport/weight-update time replaced by emd+ca's
            "emd_ca_over_one_to_one_by_phases": C.quantiles([
                (total("one-to-one", r) + sum(times["copy:emd+ca"][r][clock][p] - times["copy:one-to-one"][r][clock][p]
                                              for p in ("transport", "weight_update"))) / total("one-to-one", r)
                for r in rr]),
            "emd_over_one_to_one": C.quantiles([total("emd", r) / total("one-to-one", r) for r in rr]),
            # the target's denominator: a plain fine-tune step plus a plain teacher forward
            "distill_over_student_plus_teacher": {
                name: C.quantiles([total(name, r) / (total("finetune", r) + teacher_plain(r)) for r in rr])
                for name in ("kd", "one-to-one", "uniform", "emd", "emd+ca", "pkd")},
            "capture_teacher_over_plain_teacher": C.quantiles(
                [times["copy:emd+ca"][r][clock]["teacher_forward"] / teacher_plain(r) for r in rr]),
        }
    return summary


def markdown(results: dict[str, Any]) -> str:
    out = [f"torch threads: {results['threads']}. Per-phase times are medians of process CPU time (ms);"
           " 'wall' is the median wall time of the whole step. Ratios are medians of per-round ratios"
           " (the variants of one round run back to back).", ""]
    for key, res in results["runs"].items():
        out.append(f"### {key} (batch {res['batch']}, {res['rounds']} interleaved rounds,"
                   f" load {res['loadavg_per_round'][0]} .. {res['loadavg_per_round'][-1]})\n")
        headers = ["strategy", "CPU total", "wall total", *[p.replace("_", " ") for p in PHASES],
                   "peak MB first / later step", "features MB"]
        rows = []
        for name, s in res["strategies"].items():
            mem = res.get("memory", {}).get(name, {})
            peak = f"{mem.get('first_step_peak_mb', '-')} / {mem.get('step_peak_mb', '-')}" if mem else "-"
            rows.append([name, C.ms(s["cpu"]["total"]["median"]), C.ms(s["wall"]["total"]["median"]),
                         *[C.ms(s["cpu"][p]["median"]) for p in PHASES], peak, mem.get("features_mb", "-")])
        out.append(C.md_table(headers, rows))
        out.append("")
        for clock in ("cpu", "wall"):
            r = res["ratios"][clock]
            d = r["distill_over_student_plus_teacher"]
            e = r["emd_ca_over_one_to_one"]
            engine = r["emd_ca_over_one_to_one_engine"]
            engine_text = f" engine's own train_step {engine['median']:.3f};" if engine["n"] else ""
            out.append(f"- {clock}: EMD+CA / one-to-one {e['median']:.3f} (IQR {e['q1']:.3f}-{e['q3']:.3f};{engine_text}"
                       f" from the differing phases {r['emd_ca_over_one_to_one_by_phases']['median']:.4f}; target <= 1.05);"
                       " distillation step / (fine-tune step + plain teacher forward): "
                       + ", ".join(f"{k} {v['median']:.3f}" for k, v in d.items()) + " (target <= 1.5);"
                       f" teacher forward with capture / plain {r['capture_teacher_over_plain_teacher']['median']:.3f}")
        if res["engine_check"]:
            out.append("- timed copy / engine train_step, total CPU (medians): "
                       + ", ".join(f"{k} {v['cpu']['copy_over_engine']:.3f}" for k, v in res["engine_check"].items()))
        out.append("")
    if "crossings" in results:
        out.append("#### Host transfers and scalar reads in one engine train_step (tiny models)\n")
        for name, c in results["crossings"].items():
            out.append(f"{name}: largest explicit-device copy {c['largest_copy_elements']} elements"
                       f" ({'FEATURES CROSS' if c['features_cross'] else 'no feature tensor crosses'}),"
                       f" {c['scalar_reads']} tensor-to-Python scalar reads.\n")
            out.append(C.md_table(["what", "shape", "dtype", "count", "where"],
                                  [[e["what"], "x".join(map(str, e["shape"])) or "scalar", e["dtype"], e["count"],
                                    "`" + e["where"].replace("|", "/") + "`"] for e in c["events"]]))
            out.append("")
    if "faithful" in results:
        ok = all(v["same"] for v in results["faithful"].values())
        out.append("Timed copy vs engine train_step from identical state (tiny models, 2 steps): "
                   + ("identical loss and weights for every strategy" if ok else "MISMATCH: " + json.dumps(results["faithful"])))
    return "\n".join(out)


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default=None, help="comma-separated: " + ",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per (model, length)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-child", help=argparse_hidden())
    args = p.parse_args()
    C.set_threads(args)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    configs = args.configs.split(",") if args.configs else (["tiny"] if args.quick else list(CONFIGS))
    rounds = args.rounds or (4 if args.quick else 40)
    budget = args.budget or (5.0 if args.quick else 150.0)
    results: dict[str, Any] = {"threads": args.threads, "configs": {c: CONFIGS[c] for c in configs}, "strategies": STRATEGIES,
                               "phases": PHASES, "runs": {}}
    for config in configs:
        session, trainer = load_session(config)
        if config == "tiny":
            results["faithful"] = check_faithful(session, trainer, CONFIGS[config]["batch"], CONFIGS[config]["lengths"][0])
            results["crossings"] = {name: trace_crossings(session, trainer, name, CONFIGS[config]["batch"],
                                                          CONFIGS[config]["lengths"][0])
                                    for name in ("emd+ca", "one-to-one", "uniform", "pkd")}
        lengths = CONFIGS[config]["lengths"][:1] if args.quick else CONFIGS[config]["lengths"]
        for length in lengths:
            key = f"{config} L={length}"
            print(f"[bench_step] {key}: load {C.loadavg()}", flush=True)
            # the engine's own step is timed alongside where steps are cheap (tiny, MiniLM at 64)
            res = run_config(session, trainer, config, length, rounds, budget, engine_check=length <= 64)
            res["batch"] = CONFIGS[config]["batch"]
            res["length"] = length
            if not args.no_memory:
                names = ["finetune", "emd+ca"] if args.quick else list(STRATEGIES)
                res["memory"] = measure_memory(config, names, CONFIGS[config]["batch"], length, 1)
            results["runs"][key] = res
            print(f"[bench_step] {key}: {res['rounds']} rounds done, load {C.loadavg()}", flush=True)
    C.write_results(args, "bench_step", results, markdown(results))
    if "faithful" in results and not all(v["same"] for v in results["faithful"].values()):
        raise SystemExit("the timed copy of train_step no longer matches the engine's; update timed_step")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
