"""Teacher feature cache and mixed precision: distillation step time with the cache warm, against
the plain student step plus its own loss work, for EMD and one-to-one, in fp32 and bf16.

Everything runs through ``kdframe.step.train_step`` (each arm a ``bench_step.Arm``: the stage set up
as ``Trainer.train_stage`` sets it up) on real training batches (``kdframe.session.prepare`` with
``load_data=True``, ``kdframe.batches.collate``), with three ways of getting the teacher's
features, all inside train_step's autocast and no_grad (its ``teacher_features`` argument, as the
trainer passes the cache):

- ``live``: no cache, the teacher forward as without ``[teacher_cache]``;
- ``cached``: ``kdframe.teacher_cache.TeacherCache`` (memory, fp32 storage) after one pass over the
  example pool filled it: assembling the batch from per-example entries (slicing, padding the
  attention key columns back, moving to the device);
- ``floor``: the batch's teacher features handed over ready-made (zero cost): the student forward,
  costs, transport, loss terms, backward and optimizer step only. ``cached / floor`` is what the
  cache costs over a free teacher; ``live / cached`` is what it saves.

Per (strategy, precision) the three variants share one student, optimizer, W_h and layer weights
(timing does not depend on their values) and run back to back in each round, in a rotating order.
A precision switch rebuilds the Accelerator outside the clock (accelerate keeps one global state per
process, which the autocast of every Accelerator reads).

Also reported: the fill steps (first pass: the teacher runs on the batch padded to the longest
example of the pool, and entries are split off and stored), the bytes per example, and the error of
bf16 / fp16 storage on the loss terms (relative to a live forward, fp32 precision).

``--set`` overrides go to the recipe (e.g. ``--set data.train_limit=256``); the pool is the first
``--pool`` training examples. Real bf16-vs-fp32 dev scores: ``kdframe run recipes/emd_glue.toml
--set precision="bf16"`` (not run here).
"""

from __future__ import annotations

import time
from typing import Any

import _common as C
from bench_step import STRATEGIES as STEP_STRATEGIES
from bench_step import Arm

CONFIGS = {
    "tiny": {"recipe": "recipes/smoke_tiny.toml", "batch": 32, "pool": 64},
    "minilm": {"recipe": "recipes/emd_glue.toml", "batch": 32, "pool": 128},  # MiniLM-L6 -> layers [0, 2, 4]
    # MPNet base (all-mpnet-base-v2, 12 layers, hidden 768) -> layers [2, 5, 8, 11]: the paper's regime
    "mpnet": {"recipe": "recipes/emd_mpnet_12to4.toml", "batch": 32, "pool": 64},
}
STRATEGIES = {  # EMD with cost attention (normalize = "sum"), and one-to-one; the same layer losses
    "emd": STEP_STRATEGIES["emd+ca"],
    "one-to-one": STEP_STRATEGIES["one-to-one"],
}
PRECISIONS = ("fp32", "bf16")
VARIANTS = ("live", "cached", "floor")


class Ready:
    """The ``floor`` variant: the batch's teacher features, computed before the clock starts."""

    def __init__(self) -> None:
        self.by_batch: dict[tuple[int, ...], Any] = {}

    def features(self, indices, batch):
        return self.by_batch[tuple(indices)]


class Bench:
    def __init__(self, config: str, overrides: list[str]):
        import torch

        from kdframe.session import prepare
        from kdframe.trainer import Trainer

        spec = CONFIGS[config]
        self.pool = spec["pool"]
        torch.manual_seed(0)
        self.session = prepare(C.ROOT / spec["recipe"], [f"data.train_limit={self.pool}", "data.dev_limit=8", *overrides])
        self.session.teacher.model.eval()
        self.trainer = Trainer(self.session, run_dir=None, progress=None)  # a step reads neither
        self.precision = "fp32"
        self.batch_size = spec["batch"]
        train = self.session.train
        self.pool = min(self.pool, len(train))
        order = torch.randperm(self.pool, generator=torch.Generator().manual_seed(0)).tolist()
        self.batches = [order[i:i + self.batch_size] for i in range(0, self.pool - self.batch_size + 1, self.batch_size)]

    def activate(self, precision: str) -> None:
        """Point the trainer (and accelerate's global state) at ``precision``, outside any clock."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        if precision != self.precision:
            AcceleratorState._reset_state(True)
            mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
            self.trainer.accelerator = Accelerator(cpu=self.trainer.device.type == "cpu", mixed_precision=mixed)
            self.precision = precision

    def batch(self, indices):
        from kdframe.batches import collate

        return collate(self.session.train, indices, self.trainer.device)

    def arm(self, strategy: str, precision: str) -> Arm:
        """One strategy at one precision (its optimizer prepared by that precision's accelerator)."""
        self.activate(precision)
        return Arm(self.session, self.trainer, f"{strategy} {precision}", self.batch_size, body=STRATEGIES[strategy])

    def step(self, arm: Arm, precision: str, indices, batch, source) -> None:
        """One train_step of ``arm`` at ``precision``; ``source`` gives the teacher's features
        (a TeacherCache or Ready) or is None (the live teacher forward)."""
        self.activate(precision)
        arm.run(batch, None if source is None else (lambda b: source.features(indices, b)))


def make_cache(bench: Bench, needs, dtype: str = "fp32"):
    from kdframe.teacher_cache import TeacherCache

    host, teacher = bench.session.host, bench.session.teacher
    return TeacherCache(lambda b: host.extract_features("teacher", teacher, b, needs), bench.session.train, needs,
                        dtype=dtype)


def storage_error(bench: Bench, arm: Arm) -> dict[str, Any]:
    """Relative error of each loss term computed on bf16 / fp16-stored features (fp32 precision)."""
    import torch

    from kdframe.step import DistillStep

    bench.activate("fp32")
    plain = DistillStep(bench.session.host, arm.ctx)  # costs, flows, loss terms from given features
    arm.student.model.eval()

    def terms(teacher, batch):
        with torch.no_grad():
            student = arm.step.features("student", arm.student, batch)
            out = plain.from_features(student, teacher, batch, {})
        return {k: float(v) for k, v in out.terms.items()}

    result: dict[str, Any] = {}
    for dtype in ("fp32", "bf16", "fp16"):
        cache = make_cache(bench, arm.needs, dtype)
        worst: dict[str, float] = {}
        for indices in bench.batches:
            batch = bench.batch(indices)
            with torch.no_grad():
                cache.features(indices, batch)
                got = terms(cache.features(indices, batch), batch)
                want = terms(arm.step.features("teacher", arm.teacher, batch), batch)
            for k, v in want.items():
                worst[k] = max(worst.get(k, 0.0), abs(got[k] - v) / max(abs(v), 1e-30))
        result[dtype] = {"max_rel_error": worst, "bytes_per_example": cache.stats()["bytes"] / cache.stats()["examples"]}
    arm.student.model.train()
    return result


def run(config: str, overrides: list[str], rounds: int, budget_s: float) -> dict[str, Any]:
    import torch

    bench = Bench(config, overrides)
    lengths = [bench.batch(ix)["input_ids"].shape[1] for ix in bench.batches]
    print(f"[bench_cache] {config}: pool {bench.pool}, batches {len(bench.batches)} x {bench.batch_size},"
          f" padded lengths {lengths}, load {C.loadavg()}", flush=True)
    arms = {(s, p): bench.arm(s, p) for p in PRECISIONS for s in STRATEGIES}
    needs = next(iter(arms.values())).needs  # the same feature set for both strategies
    caches = {p: make_cache(bench, needs) for p in PRECISIONS}
    ready = {p: Ready() for p in PRECISIONS}
    fill: dict[str, list[dict[str, float]]] = {p: [] for p in PRECISIONS}
    for p in PRECISIONS:
        bench.activate(p)
        arm = arms[("emd", p)]
        bench.step(arm, p, bench.batches[0], bench.batch(bench.batches[0]), None)  # allocates AdamW state
        for indices in bench.batches:
            batch = bench.batch(indices)
            clock = C.Clock()
            bench.step(arm, p, indices, batch, caches[p])  # cold: the teacher runs and entries are stored
            wall, cpu = clock.lap()
            fill[p].append({"wall": wall, "cpu": cpu})
            with torch.no_grad(), bench.trainer.accelerator.autocast():
                ready[p].by_batch[tuple(indices)] = caches[p].features(indices, batch)
        assert caches[p].stats()["misses"] == bench.pool - bench.pool % bench.batch_size
    for (s, p), arm in arms.items():  # warm-up of every arm and variant
        for variant in VARIANTS:
            source = {"live": None, "cached": caches[p], "floor": ready[p]}[variant]
            bench.step(arm, p, bench.batches[0], bench.batch(bench.batches[0]), source)

    cells = [(s, p, v) for p in PRECISIONS for s in STRATEGIES for v in VARIANTS]
    times: dict[tuple[str, str, str], list[dict[str, float]]] = {c: [] for c in cells}
    assembly: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    loads = []
    started = time.perf_counter()
    done = 0
    for r in range(rounds):
        indices = bench.batches[r % len(bench.batches)]
        batch = bench.batch(indices)
        loads.append(C.loadavg())
        order = cells[r % len(cells):] + cells[:r % len(cells)]
        for s, p, v in order:
            source = {"live": None, "cached": caches[p], "floor": ready[p]}[v]
            bench.activate(p)
            clock = C.Clock()
            bench.step(arms[(s, p)], p, indices, batch, source)
            wall, cpu = clock.lap()
            times[(s, p, v)].append({"wall": wall, "cpu": cpu})
        for p in PRECISIONS:  # the cache's own work: assembling one batch
            bench.activate(p)
            clock = C.Clock()
            with torch.no_grad(), bench.trainer.accelerator.autocast():
                caches[p].features(indices, batch)
            assembly[p].append(clock.lap()[1])
        done = r + 1
        if done >= 3 and time.perf_counter() - started > budget_s:
            break

    def q(cell, clock="cpu"):
        return C.quantiles([t[clock] for t in times[cell]])

    def ratio(a, b, clock="cpu"):
        return C.quantiles([x[clock] / y[clock] for x, y in zip(times[a], times[b])])

    result: dict[str, Any] = {
        "pool": bench.pool, "batch": bench.batch_size, "padded_lengths": lengths, "rounds": done,
        "loadavg_per_round": loads, "needs": sorted(needs),
        "steps": {f"{s} {p} {v}": {"cpu": q((s, p, v)), "wall": q((s, p, v), "wall")} for s, p, v in cells},
        "fill_steps": {p: {"cpu": C.quantiles([t["cpu"] for t in fill[p]]),
                           "wall": C.quantiles([t["wall"] for t in fill[p]])} for p in PRECISIONS},
        "assembly_cpu": {p: C.quantiles(assembly[p]) for p in PRECISIONS},
        "cache": {p: caches[p].stats() for p in PRECISIONS},
        "ratios": {},
    }
    for s in STRATEGIES:
        for p in PRECISIONS:
            for clock in ("cpu", "wall"):
                result["ratios"][f"{s} {p} {clock}"] = {
                    "cached_over_floor": ratio((s, p, "cached"), (s, p, "floor"), clock),
                    "live_over_cached": ratio((s, p, "live"), (s, p, "cached"), clock),
                }
        for v in VARIANTS:
            for clock in ("cpu", "wall"):
                result["ratios"][f"{s} {v} bf16_over_fp32 {clock}"] = ratio((s, "bf16", v), (s, "fp32", v), clock)
    result["storage_error"] = storage_error(bench, arms[("emd", "fp32")])
    return result


def markdown(results: dict[str, Any]) -> str:
    out = [f"torch threads: {results['threads']}. Times are medians over interleaved rounds of process CPU time"
           " (what the step costs) and wall time (ms); ratios are medians of per-round ratios.", ""]
    for config, res in results["runs"].items():
        out.append(f"### {config}: batch {res['batch']}, padded lengths {sorted(set(res['padded_lengths']))},"
                   f" {res['rounds']} rounds, load {res['loadavg_per_round'][0]} .. {res['loadavg_per_round'][-1]}\n")
        rows = []
        for s in STRATEGIES:
            for p in PRECISIONS:
                cells = [res["steps"][f"{s} {p} {v}"] for v in VARIANTS]
                r = res["ratios"][f"{s} {p} cpu"]
                rw = res["ratios"][f"{s} {p} wall"]
                rows.append([s, p, *[f"{C.ms(c['cpu']['median'])} / {C.ms(c['wall']['median'])}" for c in cells],
                             f"{r['cached_over_floor']['median']:.3f} / {rw['cached_over_floor']['median']:.3f}",
                             f"{r['live_over_cached']['median']:.3f} / {rw['live_over_cached']['median']:.3f}"])
        out.append(C.md_table(["strategy", "precision", *[f"{v} CPU / wall ms" for v in VARIANTS],
                               "cached / floor (CPU / wall)", "live / cached (CPU / wall)"], rows))
        out.append("")
        prec = [f"{s} {v} {res['ratios'][f'{s} {v} bf16_over_fp32 cpu']['median']:.3f}"
                for s in STRATEGIES for v in VARIANTS]
        out.append("- bf16 / fp32 step time (CPU): " + ", ".join(prec))
        fill = ", ".join(f"{p} {C.ms(res['fill_steps'][p]['cpu']['median'])} ms" for p in PRECISIONS)
        out.append(f"- fill steps (first pass, EMD, CPU median): {fill}; assembling a batch from the cache (CPU): "
                   + ", ".join(f"{p} {C.ms(res['assembly_cpu'][p]['median'])} ms" for p in PRECISIONS))
        err = res["storage_error"]
        out.append("- storage dtype (fp32 precision): " + "; ".join(
            f"{d}: {err[d]['bytes_per_example'] / 2**20:.2f} MiB/example, max rel. error "
            + ", ".join(f"{k} {v:.1e}" for k, v in sorted(err[d]["max_rel_error"].items())) for d in err))
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default=None, help="comma-separated: " + ",".join(CONFIGS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="recipe override for every config (e.g. data.max_length=128)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per config")
    args = p.parse_args()
    C.set_threads(args)
    configs = args.configs.split(",") if args.configs else (["tiny"] if args.quick else ["minilm"])
    rounds = args.rounds or (3 if args.quick else 8)
    budget = args.budget or (5.0 if args.quick else 300.0)
    results: dict[str, Any] = {"configs": {c: CONFIGS[c] for c in configs}, "strategies": STRATEGIES,
                               "threads": args.threads, "overrides": args.overrides, "runs": {}}
    for config in configs:
        results["runs"][config] = run(config, args.overrides, rounds, budget)
    C.write_results(args, "bench_cache", results, markdown(results))


if __name__ == "__main__":
    main()
