"""Step time and peak memory per distillation strategy, split into the phases of a training step.

Every strategy runs on the same teacher, the same student weights (a copy per strategy, each with
its own optimizer, W_h and layer weights, as a run would have) and the same synthetic batches,
set up through kdframe's own pieces: ``kdframe.session.prepare`` loads the recipe's models,
``kdframe.recipe.load_recipe`` with a ``--set stages[0]={...}`` override gives each strategy's
stage, and ``stage_context`` / ``DistillStep`` / ``Optimization`` / ``extra_parameters`` /
``stage_start`` set it up as ``kdframe.trainer.Trainer.train_stage`` does.

A step is ``kdframe.step.train_step`` itself (nothing is copied): every phase of a step runs inside
``step.phase(name)``, and each arm's ``DistillStep`` is given a ``PhaseTimer.phase`` that reads the
wall clock (``time.perf_counter``) and the process CPU clock (``time.process_time``) around the
phase and still enters ``kdframe.step.marker(name)`` (so a profiler sees the same markers). The
step total is measured around ``train_step``; ``outside phases`` is the total minus the phases
(``model.train()``, entering autocast, building the ``StepRecord``).

Phases (``kdframe.step.PHASES``): teacher_forward (no_grad, capture when the strategy needs
attention), student_forward, costs (``layer_costs``), transport (``layer_mapping`` for every cost
kind, with the flow shape check), weight_update (``update_layer_weights``), loss_terms
(``loss_terms`` and their weighted sum), checks (the loss values summed and read to Python, the
finiteness checks of the terms and layer weights), backward (the student's backward *and* the
backward through the cost matrices: autograd runs them as one pass), optimizer (grad clip, AdamW
step, scheduler, zero_grad).

Memory: peak resident set size (RSS), measured in a fresh subprocess per strategy (tracemalloc
does not see torch's allocations). ``first_step_peak_mb`` is the peak RSS during the first step
minus the RSS before it (it includes AdamW's state, allocated at the first step);
``step_peak_mb`` is the peak during later steps minus the RSS before them (the activations and
temporaries of one step). Peaks are reset through /proc/self/clear_refs (Linux); the kernel's
VmHWM is read from /proc/self/status.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import _common as C
from kdframe.step import PHASES, marker

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
OUTSIDE = "outside_phases"  # the step total minus its phases
PEER = "peer-tinybert"  # PeerArm: a TinyBERT-style step written without kdframe
COLUMNS = (*PHASES, OUTSIDE, "total")


def stage_override(body: str, batch: int) -> str:
    return f'stages[0]={{ name = "bench", batch_size = {batch}, lr = 2e-5, eval_every = 0, {body} }}'


# -- setup through kdframe's pieces ---------------------------------------------------------------

def load_session(config: str):
    import torch

    from kdframe.session import prepare
    from kdframe.trainer import Trainer

    torch.manual_seed(0)
    session = prepare(C.ROOT / CONFIGS[config]["recipe"], [], load_data=False)
    trainer = Trainer(session, run_dir=None, progress=None)  # a step reads neither
    return session, trainer


class PhaseTimer:
    """The ``phase`` of a DistillStep: wall and CPU seconds per phase of the current step, inside
    kdframe.step's own marker (a profiler sees the phases as without the timer)."""

    def __init__(self) -> None:
        self.times: dict[str, dict[str, float]] = {}
        self.reset()

    def reset(self) -> None:
        self.times = {"wall": dict.fromkeys(PHASES, 0.0), "cpu": dict.fromkeys(PHASES, 0.0)}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        clock = C.Clock()
        try:
            with marker(name):
                yield
        finally:
            wall, cpu = clock.lap()
            self.times["wall"][name] += wall
            self.times["cpu"][name] += cpu


class Arm:
    """One strategy set up as Trainer.train_stage sets up a stage (``body``: the stage's strategies,
    ``STRATEGIES[strategy]`` by default). The step's autocast is the trainer's accelerator's at
    each step (bench_cache swaps it to change precision)."""

    def __init__(self, session, trainer, strategy: str, batch: int, body: str | None = None):
        import attrs
        import torch

        from kdframe.optim import Optimization
        from kdframe.recipe import load_recipe
        from kdframe.step import DistillStep, stage_context

        host, registry = session.host, session.host.registry
        body = STRATEGIES[strategy] if body is None else body
        loaded = load_recipe(session.recipe_path, [stage_override(body, batch)], registry)
        if loaded.problems:
            raise SystemExit(f"{strategy}: {loaded.problems}")
        self.name = strategy
        self.session, self.trainer = session, trainer
        self.resolved = resolved = loaded.stages[0]
        device = trainer.device
        self.teacher = session.teacher if resolved.needs_teacher(registry) else None
        self.needs = resolved.needs(registry) if self.teacher is not None else frozenset()
        model = copy.deepcopy(session.student.model)
        self.student = attrs.evolve(session.student, model=model)
        self.ctx = stage_context(None, 0, resolved, session.task, self.student, self.teacher, device)
        model.to(device)
        if self.teacher is not None:
            self.teacher.model.to(device).eval()
        self.timer = PhaseTimer()
        self.step = DistillStep(host, self.ctx, self.student, self.teacher, self.needs, phase=self.timer.phase)
        torch.manual_seed(1)  # W_h's initialisation, the same for every arm
        extra = host.extra_parameters(self.ctx)
        for module in extra.values():
            module.to(device)
        self.optimization = Optimization([model, *extra.values()], resolved.stage, 10**6, trainer.accelerator, device)
        host.stage_start(self.ctx)
        trainer.processes.broadcast_parameters(self.optimization.modules)
        self.weights: dict[str, Any] = {}

    def run(self, batch: dict[str, Any], teacher_features: Any = None) -> tuple[Any, dict[str, dict[str, float]]]:
        """One kdframe.step.train_step, timed per phase, then what Trainer.train_stage does after it
        on a step without eval, log or checkpoint. ``teacher_features(batch)`` replaces the teacher's
        forward (the teacher cache). Returns the step's record and its times."""
        from kdframe.errors import RunFailed
        from kdframe.step import train_step

        self.timer.reset()
        clock = C.Clock()
        record = train_step(self.step, self.optimization, self.trainer.processes, batch, self.weights,
                            teacher_features=teacher_features, autocast=self.trainer.accelerator.autocast)
        wall, cpu = clock.lap()
        if record.nonfinite and self.resolved.stage.nonfinite == "stop":
            raise RunFailed(f"{self.name}: non-finite {', '.join(record.nonfinite)}")
        self.weights = record.next_weights
        self.ctx.step += 1
        self.session.host.step_end(self.ctx, record.log())
        return record, step_times(self.timer, wall, cpu)


def step_times(timer: PhaseTimer, wall: float, cpu: float) -> dict[str, dict[str, float]]:
    """A step's times per clock: its phases, the total and what the phases left out."""
    times = {clock_name: dict(phases) for clock_name, phases in timer.times.items()}
    for clock_name, total in (("wall", wall), ("cpu", cpu)):
        times[clock_name][OUTSIDE] = total - sum(times[clock_name][p] for p in PHASES)
        times[clock_name]["total"] = total
    return times


class PeerArm:
    """A TinyBERT-style step as a framework built on transformers writes it, with no kdframe code
    in its step: both models run eager attention with ``output_attentions`` and
    ``output_hidden_states``; MSE between the student's attention probabilities and those of
    teacher layer (m+1) N/M - 1, MSE between the mapped student hidden states (a trainable linear
    map, as TinyBERT's ``fit_dense``) and teacher states 0, N/M, ..., N; soft cross-entropy on the
    logits. Only the pairs it uses are computed. The optimizer is kdframe's (``kdframe.optim.adamw``)
    with the same clipping, so the comparison is about the distillation work alone."""

    def __init__(self, session, trainer, batch: int):
        import torch

        from kdframe.optim import adamw

        self.trainer, self.weights = trainer, {}
        self.teacher = session.teacher.model.to(trainer.device).eval()
        self.student = copy.deepcopy(session.student.model).to(trainer.device)
        torch.manual_seed(1)
        self.fit_dense = torch.nn.Linear(self.student.config.hidden_size, self.teacher.config.hidden_size).to(trainer.device)
        self.optimizer = adamw([self.student, self.fit_dense], 0.01, 2e-5, trainer.device)
        m, n = self.student.config.num_hidden_layers, self.teacher.config.num_hidden_layers
        self.attn_pairs = [(i, (i + 1) * n // m - 1) for i in range(m)]
        self.hidden_pairs = [(i, i * n // m) for i in range(m + 1)]
        self.timer = PhaseTimer()

    def run(self, batch: dict[str, Any], teacher_features: Any = None) -> tuple[None, dict[str, dict[str, float]]]:
        import torch
        import torch.nn.functional as F

        inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
        phase = self.timer.phase
        self.timer.reset()
        clock = C.Clock()
        self.student.train()
        with (C.attn_implementation(self.teacher, "eager"), C.attn_implementation(self.student, "eager"),
              self.trainer.accelerator.autocast()):
            with phase("teacher_forward"), torch.no_grad():
                t = self.teacher(**inputs, output_hidden_states=True, output_attentions=True)
            with phase("student_forward"):
                s = self.student(**inputs, output_hidden_states=True, output_attentions=True)
            with phase("loss_terms"):
                att = sum(F.mse_loss(s.attentions[i], t.attentions[j]) for i, j in self.attn_pairs)
                hid = sum(F.mse_loss(self.fit_dense(s.hidden_states[i]), t.hidden_states[j]) for i, j in self.hidden_pairs)
                pred = -(F.softmax(t.logits, -1) * F.log_softmax(s.logits, -1)).sum(-1).mean()
                loss = 0.005 * att + 0.005 * hid + pred
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_([*self.student.parameters(), *self.fit_dense.parameters()], 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        wall, cpu = clock.lap()
        return None, step_times(self.timer, wall, cpu)


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


# -- what crosses to the host ----------------------------------------------------------------------

def trace_crossings(session, trainer, strategy: str, batch_size: int, length: int) -> dict[str, Any]:
    """Run one kdframe.step.train_step under a dispatch mode that records every copy with an
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
    arm.run(batch)  # the first step creates the layer weights
    tolist = torch.Tensor.tolist

    def traced_tolist(tensor):  # not a dispatched op; on a GPU it copies the tensor to the host
        events[("tolist (read to Python)", tuple(tensor.shape), str(tensor.dtype), caller(2))] += 1
        return tolist(tensor)

    torch.Tensor.tolist = traced_tolist
    try:
        with Crossings():
            arm.run(batch)
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

def feature_megabytes(arm: Arm, batch) -> float:
    """Bytes of the hidden states and attention scores both models hand to the strategies."""
    import torch

    total = 0
    with torch.no_grad():
        for role, loaded in (("teacher", arm.teacher), ("student", arm.student)):
            if loaded is None:
                continue
            f = arm.step.features(role, loaded, batch)
            for group in (f.hidden or ()), (f.attn or ()):
                total += sum(t.numel() * t.element_size() for t in group)
    return total / 2**20


def memory_child(spec: str) -> None:
    """Peak RSS of each strategy's steps, one strategy after the other in this process.

    Started with MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=0 so glibc maps every
    block of 64 KiB or more on its own and returns it on free: RSS then follows live memory, and
    what one strategy freed does not hide the next one's allocations.
    """
    job = json.loads(spec)
    session, trainer = load_session(job["config"])
    batch = synthetic_batch(session, job["batch"], job["length"], seed=0)
    out = {}
    for strategy in job["strategies"]:
        arm = Arm(session, trainer, strategy, job["batch"])
        features_mb = feature_megabytes(arm, batch)
        gc.collect()
        resettable = C.reset_peak()
        rss0 = C.status_kb("VmRSS")
        record, _ = arm.run(batch)
        peak1 = C.status_kb("VmHWM")
        del record
        gc.collect()
        C.reset_peak()
        rss1 = C.status_kb("VmRSS")
        for _ in range(job["steps"]):
            record, _ = arm.run(batch)
        peak2 = C.status_kb("VmHWM")
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

def run_config(session, trainer, config: str, length: int, rounds: int, budget_s: float) -> dict[str, Any]:
    batch_size = CONFIGS[config]["batch"]
    arms: dict[str, Any] = {name: Arm(session, trainer, name, batch_size) for name in STRATEGIES}
    if session.teacher is not None:
        arms[PEER] = PeerArm(session, trainer, batch_size)
    batches = [synthetic_batch(session, batch_size, length, seed=s) for s in range(4)]
    names = list(arms)
    times: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in names}
    loads = []

    for name in names:  # warm-up: first steps allocate optimizer state, fill caches
        arms[name].run(batches[0])
    started = time.perf_counter()
    done = 0
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        batch = batches[r % len(batches)]
        loads.append(C.loadavg())
        for name in order:
            times[name].append(arms[name].run(batch)[1])
        done = r + 1
        if done >= 3 and time.perf_counter() - started > budget_s:
            break

    summary: dict[str, Any] = {"rounds": done, "loadavg_per_round": loads, "strategies": {}, "ratios": {}}
    for name in arms:
        rows = times[name]
        summary["strategies"][name] = {
            clock: {p: C.quantiles([row[clock][p] for row in rows]) for p in COLUMNS}
            for clock in ("cpu", "wall")}
        summary["strategies"][name]["layer_weights_after"] = {k: [w.tolist() for w in ws]
                                                              for k, ws in arms[name].weights.items()}

    for clock in ("cpu", "wall"):
        def total(name: str, r: int) -> float:
            return times[name][r][clock]["total"]

        def teacher_plain(r: int) -> float:  # the kd arm's teacher forward: no capture, logits only
            return times["kd"][r][clock]["teacher_forward"]

        rr = range(done)
        summary["ratios"][clock] = {
            "emd_ca_over_one_to_one": C.quantiles([total("emd+ca", r) / total("one-to-one", r) for r in rr]),
            "emd_over_one_to_one": C.quantiles([total("emd", r) / total("one-to-one", r) for r in rr]),
            # the target's denominator: a plain fine-tune step plus a plain teacher forward
            "distill_over_student_plus_teacher": {
                name: C.quantiles([total(name, r) / (total("finetune", r) + teacher_plain(r)) for r in rr])
                for name in ("kd", "one-to-one", "uniform", "emd", "emd+ca", "pkd")},
            # the floor: a fine-tune step plus the strategy's own teacher forward (hidden states and
            # captured attention): what any layer-wise distillation pays before its costs and losses
            "over_floor": {
                name: C.quantiles([total(name, r) / (total("finetune", r) + times[name][r][clock]["teacher_forward"])
                                   for r in rr])
                for name in ("one-to-one", "uniform", "emd", "emd+ca", "pkd")},
            **({"one_to_one_over_peer": C.quantiles([total("one-to-one", r) / total(PEER, r) for r in rr]),
                "emd_ca_over_peer": C.quantiles([total("emd+ca", r) / total(PEER, r) for r in rr]),
                "peer_over_floor": C.quantiles([total(PEER, r) / (total("finetune", r) + times["one-to-one"][r][clock]["teacher_forward"])
                                                for r in rr])} if PEER in arms else {}),
            "capture_teacher_over_plain_teacher": C.quantiles(
                [times["emd+ca"][r][clock]["teacher_forward"] / teacher_plain(r) for r in rr]),
        }
    return summary


def markdown(results: dict[str, Any]) -> str:
    out = [f"torch threads: {results['threads']}. Per-phase times are medians of process CPU time (ms), timed"
           " by the markers inside kdframe.step.train_step; 'wall' is the median wall time of the whole step;"
           " 'outside phases' is the step total minus its phases. Ratios are medians of per-round ratios"
           " (the variants of one round run back to back).", ""]
    for key, res in results["runs"].items():
        out.append(f"### {key} (batch {res['batch']}, {res['rounds']} interleaved rounds,"
                   f" load {res['loadavg_per_round'][0]} .. {res['loadavg_per_round'][-1]})\n")
        parts = (*PHASES, OUTSIDE)
        headers = ["strategy", "CPU total", "wall total", *[p.replace("_", " ") for p in parts],
                   "peak MB first / later step", "features MB"]
        rows = []
        for name, s in res["strategies"].items():
            mem = res.get("memory", {}).get(name, {})
            peak = f"{mem.get('first_step_peak_mb', '-')} / {mem.get('step_peak_mb', '-')}" if mem else "-"
            rows.append([name, C.ms(s["cpu"]["total"]["median"]), C.ms(s["wall"]["total"]["median"]),
                         *[C.ms(s["cpu"][p]["median"]) for p in parts], peak, mem.get("features_mb", "-")])
        out.append(C.md_table(headers, rows))
        out.append("")
        for clock in ("cpu", "wall"):
            r = res["ratios"][clock]
            d = r["distill_over_student_plus_teacher"]
            e = r["emd_ca_over_one_to_one"]
            f = r["over_floor"]
            out.append(f"- {clock}: EMD+CA / one-to-one {e['median']:.3f} (IQR {e['q1']:.3f}-{e['q3']:.3f});"
                       " step / floor (fine-tune step + its teacher forward with capture): "
                       + ", ".join(f"{k} {v['median']:.3f} (IQR {v['q1']:.3f}-{v['q3']:.3f})" for k, v in f.items())
                       + "; distillation step / (fine-tune step + plain teacher forward): "
                       + ", ".join(f"{k} {v['median']:.3f}" for k, v in d.items()) + " (target <= 1.5);"
                       f" teacher forward with capture / plain {r['capture_teacher_over_plain_teacher']['median']:.3f}"
                       + ("".join(f"; {k.replace('_', ' ')} {r[k]['median']:.3f} (IQR {r[k]['q1']:.3f}-{r[k]['q3']:.3f})"
                                  for k in ("one_to_one_over_peer", "emd_ca_over_peer", "peer_over_floor"))
                          if "one_to_one_over_peer" in r else ""))
        out.append("")
    if "crossings" in results:
        out.append("#### Host transfers and scalar reads in one kdframe.step.train_step (tiny models)\n")
        for name, c in results["crossings"].items():
            out.append(f"{name}: largest explicit-device copy {c['largest_copy_elements']} elements"
                       f" ({'FEATURES CROSS' if c['features_cross'] else 'no feature tensor crosses'}),"
                       f" {c['scalar_reads']} tensor-to-Python scalar reads.\n")
            out.append(C.md_table(["what", "shape", "dtype", "count", "where"],
                                  [[e["what"], "x".join(map(str, e["shape"])) or "scalar", e["dtype"], e["count"],
                                    "`" + e["where"].replace("|", "/") + "`"] for e in c["events"]]))
            out.append("")
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
            results["crossings"] = {name: trace_crossings(session, trainer, name, CONFIGS[config]["batch"],
                                                          CONFIGS[config]["lengths"][0])
                                    for name in ("emd+ca", "one-to-one", "uniform", "pkd")}
        lengths = CONFIGS[config]["lengths"][:1] if args.quick else CONFIGS[config]["lengths"]
        for length in lengths:
            key = f"{config} L={length}"
            print(f"[bench_step] {key}: load {C.loadavg()}", flush=True)
            res = run_config(session, trainer, config, length, rounds, budget)
            res["batch"] = CONFIGS[config]["batch"]
            res["length"] = length
            if not args.no_memory:
                names = ["finetune", "emd+ca"] if args.quick else list(STRATEGIES)
                res["memory"] = measure_memory(config, names, CONFIGS[config]["batch"], length, 1)
            results["runs"][key] = res
            print(f"[bench_step] {key}: {res['rounds']} rounds done, load {C.loadavg()}", flush=True)
    C.write_results(args, "bench_step", results, markdown(results))


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
