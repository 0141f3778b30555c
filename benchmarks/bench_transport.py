"""Transport solvers for the layer mapping: time per solve and agreement of the flows.

For M x N from 2x6 to 24x48, on cost matrices of two kinds (uniform random, and 'layered':
cheap where relative depths match, as real cost matrices are) and two kinds of layer weights
(uniform, and random on the simplex as cost attention produces), it times:

- ``ot.emd``: POT's network simplex on the M x N block (numpy in, numpy out);
- ``kdframe emd_flow``: kdframe_emd.emd_flow, the same solve with its torch <-> numpy handling
  (detach, float64 on the CPU, renormalise, back to the cost's dtype/device);
- ``pyemd cpp`` / ``pyemd pot``: ``pyemd.emd_with_flow`` on the padded (M+N) x (M+N) problem the
  BERT-EMD reference code builds (student mass in the first M bins, teacher mass in the last N,
  the cost block and its transpose off the diagonal), padding and flow extraction included;
  pyemd >= 1.0 has two backends: the original C++ (Pele & Werman) and POT;
- ``ot.sinkhorn``: entropic OT with reg = 0.1 and 0.01 times the mean cost (a soft plan).

Agreement with ``ot.emd``: the largest absolute difference of a flow entry and the relative
difference of the transport cost sum(F * D). The flow of an exact solver is unique for costs
in general position, so exact solvers should agree to rounding.

Last, the whole per-step path as a training step (``kdframe.step``) runs it for EMD + cost
attention: the ``kdframe_layer_mapping`` hook for att and hid, then ``kdframe_update_layer_weights``,
through the plugin host's typed methods (pluggy dispatch included), on cost tensors that carry an
autograd graph.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import _common as C

SIZES = [(2, 6), (3, 6), (4, 12), (6, 12), (12, 24), (24, 48)]


def problems(M: int, N: int, seed: int = 0) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(seed + 1000 * M + N)
    depth = (np.arange(1, M + 1)[:, None] / M - np.arange(1, N + 1)[None, :] / N) ** 2
    costs = {"random": rng.uniform(0.0, 1.0, (M, N)),
             "layered": 1.0 + 20.0 * depth + 0.2 * rng.uniform(0.0, 1.0, (M, N))}
    weights = {"uniform": (np.full(M, 1.0 / M), np.full(N, 1.0 / N)),
               "simplex": (rng.dirichlet(np.ones(M) * 5), rng.dirichlet(np.ones(N) * 5))}
    return [{"name": f"{c}/{w}", "D": D, "a": a, "b": b} for c, D in costs.items() for w, (a, b) in weights.items()]


def solvers(have_pyemd: bool) -> dict[str, Callable[[Any, Any, Any], Any]]:
    import numpy as np
    import ot
    import torch

    from kdframe_emd import emd_flow

    def pot_emd(a, b, D):
        return ot.emd(a, b, D)

    def kdframe_emd(a, b, D):
        cost = torch.as_tensor(D, dtype=torch.float32)
        return emd_flow(cost, torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)).double().numpy()

    def padded(backend):
        from pyemd import emd_with_flow

        def solve(a, b, D):  # as lxk00/BERT-EMD builds the problem
            M, N = D.shape
            first = np.concatenate((a, np.zeros(N)))
            second = np.concatenate((np.zeros(M), b))
            square = np.zeros((M + N, M + N))
            square[:M, M:] = D
            square[M:, :M] = D.T
            _, flow = emd_with_flow(first, second, square, backend=backend)
            return np.array(flow)[:M, M:]

        return solve

    def sinkhorn(rel):
        def solve(a, b, D):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "did not converge" is reported through the agreement
                return ot.sinkhorn(a, b, D, reg=rel * D.mean())
        return solve

    out = {"ot.emd": pot_emd, "kdframe emd_flow": kdframe_emd}
    if have_pyemd:
        out["pyemd cpp (padded)"] = padded("cpp")
        out["pyemd pot (padded)"] = padded("pot")
    out["ot.sinkhorn reg=0.1*mean"] = sinkhorn(0.1)
    out["ot.sinkhorn reg=0.01*mean"] = sinkhorn(0.01)
    return out


def cold_times(fn: Callable[[], Any], repeats: int, budget_s: float) -> dict[str, Any]:
    """Times of ``fn``, each call after streaming 64 MB through the caches (not timed): in a
    training step the transport runs right after the cost matrices streamed hundreds of MB."""
    import torch

    junk = torch.ones(16 * 2**20)
    fn()
    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    started = time.perf_counter()
    for i in range(repeats):
        junk.mul_(1.0000001)
        clock = C.Clock()
        fn()
        wall, cpu = clock.lap()
        times["wall"].append(wall)
        times["cpu"].append(cpu)
        if i >= 3 and time.perf_counter() - started > budget_s:
            break
    return {clock: C.quantiles(times[clock]) for clock in ("cpu", "wall")}


def hook_path(M: int, N: int, repeats: int, budget_s: float) -> dict[str, Any]:
    """The mapping hook (att, hid) + the weighting hook for emd_glue, through the step's own
    ``DistillStep.map_layers``, with the stage context ``stage_context`` builds for an M-layer
    student and an N-layer teacher (hidden 384, 12 heads)."""
    import torch

    from kdframe.plugins import load_plugins
    from kdframe.recipe import load_recipe
    from kdframe.step import DistillStep, stage_context
    from kdframe.types import LoadedModel

    host = load_plugins()
    loaded = load_recipe(C.ROOT / "recipes" / "emd_glue.toml", [], host.registry)
    assert not loaded.problems, loaded.problems
    resolved = loaded.stages[0]
    task = host.registry.task(loaded.recipe.data.task).info
    cpu = torch.device("cpu")

    def shape(layers: int) -> LoadedModel:  # what stage_context reads of a model
        return LoadedModel(model=None, tokenizer=None, description=f"{layers} layers", num_layers=layers,
                           hidden_size=384, num_heads=12, vocab_size=0)

    ctx = stage_context(None, 0, resolved, task, shape(M), shape(N), cpu)
    g = torch.Generator().manual_seed(0)
    leaves = {k: torch.rand(M, N, generator=g, requires_grad=True) for k in ("att", "hid")}
    costs = {k: v * 1.0 for k, v in leaves.items()}  # non-leaf, with a graph, like a step's
    mapper = DistillStep(host, ctx)
    state: dict[str, Any] = {"weights": {}}

    def step():
        state["weights"] = mapper.map_layers(costs, state["weights"])[2]

    times = C.time_calls(step, repeats, warmup=5, budget_s=budget_s)
    out = {clock: C.quantiles(times[clock]) for clock in ("cpu", "wall")}
    out["cold"] = cold_times(step, max(3, repeats // 5), budget_s)
    return out


# -- candidate replacements (benchmark-local prototypes, checked against the plugins' results) ----

def emd_flow_lean(cost, w_s, w_t):
    """kdframe_emd.emd_flow with POT's Python-side checks off and numpy for the small steps."""
    import numpy as np
    import ot
    import torch

    a = w_s.detach().to("cpu", torch.float64).numpy()
    b = w_t.detach().to("cpu", torch.float64).numpy()
    a, b = a / a.sum(), b / b.sum()
    d = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(d).all():
        flow = np.outer(a, b)
    else:
        flow = ot.emd(a, b, d, check_marginals=False, center_dual=False)
    return torch.from_numpy(flow).to(cost.device, cost.dtype)


def cost_attention_numpy(flows, costs, weights, eps: float = 1e-8):
    """kdframe_cost_attention.cost_attention (normalize="sum", separate=false) in float64 numpy:
    the (M, N) matrices are tiny, so torch's per-op overhead is most of the current cost."""
    import numpy as np
    import torch

    def attend(moved, w):
        ratio = np.maximum(moved / w, eps)
        score = ratio.sum() / ratio
        return score / score.sum()

    new_s, new_t = [], []
    for kind, (w_s, w_t) in weights.items():
        moved = (flows[kind].detach() * costs[kind].detach()).to("cpu", torch.float64).numpy()
        new_s.append(attend(moved.sum(1), w_s.detach().to("cpu", torch.float64).numpy()))
        new_t.append(attend(moved.sum(0), w_t.detach().to("cpu", torch.float64).numpy()))

    def simplex(w, like):
        w = np.maximum(np.where(np.isfinite(w), w, 0.0), eps)
        return torch.from_numpy(w / w.sum()).to(like.device, like.dtype)

    avg_s, avg_t = np.mean(new_s, 0), np.mean(new_t, 0)
    return {kind: (simplex(avg_s, w_s), simplex(avg_t, w_t)) for kind, (w_s, w_t) in weights.items()}


def fused_numpy_step(costs, weights_np, eps: float = 1e-8):
    """Both solves and the cost-attention update in one place, in float64 numpy, with the layer
    weights kept on the CPU as numpy state: per step only each (M, N) cost goes to the CPU and
    each flow comes back. (A prototype of an EMD+CA plugin that owns its weights.)"""
    import numpy as np
    import ot
    import torch

    flows, new_s, new_t = {}, [], []
    for kind, cost in costs.items():
        a, b = weights_np[kind]
        d = cost.detach().to("cpu", torch.float64).numpy()
        f = ot.emd(a, b, d, check_marginals=False, center_dual=False) if np.isfinite(d).all() else np.outer(a, b)
        flows[kind] = torch.from_numpy(f).to(cost.device, cost.dtype)
        moved = f * d
        for side, w, out in ((moved.sum(1), a, new_s), (moved.sum(0), b, new_t)):
            ratio = np.maximum(side / w, eps)
            score = ratio.sum() / ratio
            out.append(score / score.sum())

    def simplex(w):
        w = np.maximum(np.where(np.isfinite(w), w, 0.0), eps)
        return w / w.sum()

    avg = (simplex(np.mean(new_s, 0)), simplex(np.mean(new_t, 0)))
    return flows, {kind: avg for kind in costs}


def breakdown(M: int, N: int, repeats: int, budget_s: float) -> dict[str, Any]:
    """Where the per-step transport + weight-update time goes, and what the prototypes save."""
    import numpy as np
    import ot
    import torch

    from kdframe_cost_attention import CostAttentionParams
    from kdframe_cost_attention.update import cost_attention
    from kdframe_emd import emd_flow

    p = problems(M, N)[1]  # random costs, random weights on the simplex
    a, b, D = p["a"], p["b"], p["D"]
    leaves = {k: torch.tensor(D * (1 + i), dtype=torch.float32, requires_grad=True) for i, k in enumerate(("att", "hid"))}
    costs = {k: v * 1.0 for k, v in leaves.items()}
    weights = {k: (torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)) for k in costs}
    flows = {k: emd_flow(c, *weights[k]) for k, c in costs.items()}
    params = CostAttentionParams()
    weights_np = {k: (np.asarray(a, dtype=np.float64) / a.sum(), np.asarray(b, dtype=np.float64) / b.sum()) for k in costs}
    pieces: dict[str, Callable[[], Any]] = {
        "ot.emd (defaults)": lambda: ot.emd(a, b, D),
        "ot.emd(check_marginals=False, center_dual=False)": lambda: ot.emd(a, b, D, check_marginals=False, center_dual=False),
        "kdframe emd_flow (one kind)": lambda: emd_flow(costs["att"], *weights["att"]),
        "emd_flow_lean (one kind, prototype)": lambda: emd_flow_lean(costs["att"], *weights["att"]),
        "kdframe cost_attention (att+hid)": lambda: cost_attention(flows, costs, weights, params),
        "cost_attention_numpy (att+hid, prototype)": lambda: cost_attention_numpy(flows, costs, weights),
        "direct: 2 x emd_flow + cost_attention": lambda: cost_attention(
            {k: emd_flow(c, *weights[k]) for k, c in costs.items()}, costs, weights, params),
        "direct: 2 x emd_flow_lean + cost_attention_numpy": lambda: cost_attention_numpy(
            {k: emd_flow_lean(c, *weights[k]) for k, c in costs.items()}, costs, weights),
        "direct: fused numpy step (prototype)": lambda: fused_numpy_step(costs, weights_np),
    }
    try:
        from ot.lp.emd_wrap import emd_c  # private: the C solver alone, for scale

        pieces["POT emd_c (C solver alone, private API)"] = lambda: emd_c(a, b, D, 100000, 1, None, None)
    except Exception:  # noqa: BLE001 - a private API; its signature changes between versions
        pass
    # the prototypes must give the plugins' results
    lean_flows = {k: emd_flow_lean(c, *weights[k]) for k, c in costs.items()}
    fused_flows, fused_weights = fused_numpy_step(costs, weights_np)
    plugin_weights = cost_attention(flows, costs, weights, params)
    check = {
        "fused_flow_max_abs_diff": max(float((fused_flows[k] - flows[k]).abs().max()) for k in costs),
        "fused_weights_max_abs_diff": max(float(np.abs(x - y.double().numpy()).max())
                                          for k in costs for x, y in zip(fused_weights[k], plugin_weights[k])),
        "flow_max_abs_diff": max(float((lean_flows[k] - flows[k]).abs().max()) for k in costs),
        "weights_max_abs_diff": max(float((x - y).abs().max())
                                    for k in costs
                                    for x, y in zip(cost_attention(flows, costs, weights, params)[k],
                                                    cost_attention_numpy(flows, costs, weights)[k])),
    }
    times = C.interleaved(pieces, repeats, warmup=10, budget_s=budget_s)
    cold = {name: cold_times(pieces[name], max(3, repeats // 5), budget_s / 2)
            for name in pieces if name.startswith("direct")}
    return {"M": M, "N": N, "loadavg": C.loadavg(), "prototype_check": check,
            "pieces": {name: {clock: C.quantiles(times[name][clock]) for clock in ("cpu", "wall")} for name in pieces},
            "cold": cold}


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    C.set_threads(args)
    import numpy as np

    try:
        import pyemd  # noqa: F401
        have_pyemd = True
    except ImportError:
        have_pyemd = False
        print("[bench_transport] pyemd is not installed: its comparison is skipped (pip install pyemd)")
    sizes = [(2, 6), (6, 12)] if args.quick else SIZES
    repeats = 20 if args.quick else 300
    budget = 0.5 if args.quick else 6.0
    table = solvers(have_pyemd)
    results: dict[str, Any] = {"threads": args.threads, "pyemd": have_pyemd, "sizes": []}
    for M, N in sizes:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"M": M, "N": N, "loadavg": C.loadavg(), "solvers": {}}
        probs = problems(M, N)
        reference = [table["ot.emd"](p["a"], p["b"], p["D"]) for p in probs]
        for name, solve in table.items():
            flows = [solve(p["a"], p["b"], p["D"]) for p in probs]
            diffs = [float(np.abs(f - r).max()) for f, r in zip(flows, reference)]
            rel_cost = [float(((f * p["D"]).sum() - (r * p["D"]).sum()) / (r * p["D"]).sum())
                        for f, r, p in zip(flows, reference, probs)]
            marginals = [float(max(np.abs(f.sum(1) - p["a"]).max(), np.abs(f.sum(0) - p["b"]).max()))
                         for f, p in zip(flows, probs)]
            per_problem = max(3, repeats // len(probs))
            times: dict[str, list[float]] = {"wall": [], "cpu": []}
            for p in probs:
                t = C.time_calls(lambda p=p: solve(p["a"], p["b"], p["D"]), per_problem, warmup=2,
                                 budget_s=budget / len(probs))
                times["wall"] += t["wall"]
                times["cpu"] += t["cpu"]
            row["solvers"][name] = {
                "time": {clock: C.quantiles(times[clock]) for clock in ("cpu", "wall")},
                "max_abs_flow_diff": max(diffs), "max_rel_cost_diff": max(rel_cost, key=abs),
                "max_marginal_error": max(marginals),
                "per_problem": {p["name"]: {"flow_diff": d, "rel_cost_diff": c} for p, d, c in zip(probs, diffs, rel_cost)},
            }
        import ot

        for rel in (0.1, 0.01):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row[f"sinkhorn_iterations reg={rel}*mean"] = [
                    int(ot.sinkhorn(p["a"], p["b"], p["D"], reg=rel * p["D"].mean(), log=True)[1]["niter"]) for p in probs]
        # the key keeps its name from before kdframe.engine was split up: results stay comparable
        row["engine_step_path"] = hook_path(M, N, 50 if args.quick else 500, budget)
        if (M, N) in ((3, 6), (6, 12)):
            row["breakdown"] = breakdown(M, N, 30 if args.quick else 400, budget)
        results["sizes"].append(row)
        print(f"[bench_transport] {M}x{N}: {time.perf_counter() - t0:.1f}s, load {C.loadavg()}", flush=True)
    C.write_results(args, "bench_transport", results, markdown(results))


def markdown(results: dict[str, Any]) -> str:
    names = list(results["sizes"][0]["solvers"])
    out = [f"Median process CPU time per solve in microseconds (torch threads {results['threads']});"
           " agreement with ot.emd over 4 problems per size: largest |F - F_emd| and relative difference"
           " of sum(F * D). 'step path' = kdframe_layer_mapping for att and hid + kdframe_update_layer_weights"
           " through the plugin host (EMD + cost attention), per training step; 'cold' = each call after"
           " streaming 64 MB through the caches, as in a training step."
           + ("" if results["pyemd"] else " pyemd was not installed: its columns are missing."), ""]
    headers = ["M x N", *[f"{n} us" for n in names], "step path us (warm / cold cache)", "load"]
    rows = [[f"{r['M']}x{r['N']}", *[C.us(r["solvers"][n]["time"]["cpu"]["median"]) for n in names],
             f"{C.us(r['engine_step_path']['cpu']['median'])} / {C.us(r['engine_step_path']['cold']['cpu']['median'])}",
             r["loadavg"][0]] for r in results["sizes"]]
    out.append(C.md_table(headers, rows))
    out.append("")
    headers = ["M x N", *[f"{n} max dF / rel cost" for n in names[1:]]]
    rows = [[f"{r['M']}x{r['N']}", *[f"{r['solvers'][n]['max_abs_flow_diff']:.2g} / {r['solvers'][n]['max_rel_cost_diff']:.2g}"
                                     for n in names[1:]]] for r in results["sizes"]]
    out.append(C.md_table(headers, rows))
    for r in results["sizes"]:
        if "breakdown" not in r:
            continue
        b = r["breakdown"]
        out.append(f"\n#### Per-step transport + weight update, {r['M']}x{r['N']}: where the time goes\n")
        out.append(C.md_table(["piece", "CPU us (median)", "wall us (median)", "CPU us, cold cache"],
                              [[name, C.us(v["cpu"]["median"]), C.us(v["wall"]["median"]),
                                C.us(b["cold"][name]["cpu"]["median"]) if name in b["cold"] else "-"]
                               for name, v in b["pieces"].items()]))
        c = b["prototype_check"]
        out.append(f"\nPrototypes vs plugins: flows differ by at most {max(c['flow_max_abs_diff'], c['fused_flow_max_abs_diff']):.2g},"
                   f" layer weights by at most {max(c['weights_max_abs_diff'], c['fused_weights_max_abs_diff']):.2g}.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
