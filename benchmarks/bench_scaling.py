"""How the layer-cost matrices and the per-step transport scale with layer counts and length.

Features are random tensors shaped like MiniLM's (12 heads, hidden 384): attention scores
(B, 12, L, L) per layer and hidden states (B, L, 384) per layer plus the embedding output.
For every size it times, on the same tensors:

- ``batched``: kdframe_costs.matrices.att_cost + hid_cost, the functions a training step calls through
  ``kdframe_layer_costs``. Issue 8's results measured their old form (layers stacked, one matmul
  through ||a||^2 + ||b||^2 - 2 a.b); they now do one ``F.mse_loss`` per pair of unstacked
  layers, like ``loop`` (docs/performance.md);
- ``loop``: a per-pair Python loop of ``F.mse_loss(s_i, t_j)`` (the reference code's way; W_h
  applied once per student layer), written here;
- ``lean`` (benchmark-local): the old one-matmul form without its full-size temporaries: squared
  norms through ``torch.linalg.vector_norm`` instead of ``(s * s).sum(1)``, and ``2 * (s @ t.T)``
  (scales the M x N product) instead of ``2 * s @ t.T`` (which Python reads as ``(2 * s) @ t.T``:
  a full copy of the student stack);
- forward only, and forward + backward of ``sum(F * D)`` (gradients flow to the student);
- ``transport``: what one step spends after the costs for EMD + cost attention: kdframe_emd.emd_flow
  for att and hid, then kdframe_cost_attention.cost_attention.

Sizes: M x N in 2x6 .. 24x48 at B=8, L=64 (small enough for the loop at 24x48), and L in
64..512 at 3x6 (the MiniLM student) with B = 32, 32, 8, 2 (B * L^2 constant from L=128 on).
"""

from __future__ import annotations

import time
from typing import Any

import _common as C

LAYER_SIZES = [(2, 6), (3, 6), (4, 12), (6, 12), (12, 24), (24, 48)]
LENGTHS = [(64, 32), (128, 32), (256, 8), (512, 2)]  # (L, B)
HEADS, HIDDEN = 12, 384


def make_features(M: int, N: int, B: int, L: int, seed: int = 0):
    import torch

    from kdframe.api import Features

    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.long)

    def model(layers: int, grad: bool) -> Features:
        attn = tuple(torch.randn(B, HEADS, L, L, generator=g).requires_grad_(grad) for _ in range(layers))
        hidden = tuple(torch.randn(B, L, HIDDEN, generator=g).requires_grad_(grad) for _ in range(layers + 1))
        return Features(logits=None, mask=mask, hidden=hidden, attn=attn)

    return model(M, True), model(N, False)


def lean_pairwise_mse(student, teacher):
    """pairwise_mse's formula (keep=None case) without full-size temporaries."""
    import torch

    s, t = student.float().flatten(1), teacher.float().flatten(1)
    ss = torch.linalg.vector_norm(s, dim=1).square()
    tt = torch.linalg.vector_norm(t, dim=1).square()
    return (ss[:, None] + tt[None, :] - 2 * (s @ t.T)).clamp_min(0) / s.shape[1]


def costs_batched(student, teacher, proj):
    from kdframe_costs import AttParams, HiddenParams
    from kdframe_costs.matrices import att_cost, hid_cost

    return {"att": att_cost(student, teacher, AttParams()), "hid": hid_cost(student, teacher, proj, HiddenParams())}


def costs_lean(student, teacher, proj):
    import torch

    return {"att": lean_pairwise_mse(torch.stack(student.attn), torch.stack(teacher.attn)),
            "hid": lean_pairwise_mse(proj(torch.stack(student.hidden[1:])), torch.stack(teacher.hidden[1:]))}


def costs_loop(student, teacher, proj):
    import torch
    import torch.nn.functional as F

    out = {}
    projected = [proj(h) for h in student.hidden[1:]]
    for kind, s_layers, t_layers in (("att", student.attn, teacher.attn), ("hid", projected, teacher.hidden[1:])):
        rows = [torch.stack([F.mse_loss(s, t) for t in t_layers]) for s in s_layers]
        out[kind] = torch.stack(rows)
    return out


def transport_step(costs, weights):
    """EMD flows for att and hid, then the cost-attention update (kdframe.step's order)."""
    from kdframe_cost_attention import CostAttentionParams
    from kdframe_cost_attention.update import cost_attention
    from kdframe_emd import emd_flow

    flows = {kind: emd_flow(cost, *weights[kind]) for kind, cost in costs.items()}
    return cost_attention(flows, costs, weights, CostAttentionParams())


def measure(M: int, N: int, B: int, L: int, repeats: int, budget_s: float, loop: bool) -> dict[str, Any]:
    import torch

    student, teacher = make_features(M, N, B, L)
    proj = torch.nn.Linear(HIDDEN, HIDDEN)
    flow = {k: torch.rand(M, N) / (M * N) for k in ("att", "hid")}
    variants = {"batched": costs_batched, "lean": costs_lean}
    if loop:
        variants["loop"] = costs_loop

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(student, teacher, proj)
        return run

    def forward_backward(fn):
        def run():
            costs = fn(student, teacher, proj)
            sum((flow[k] * c).sum() for k, c in costs.items()).backward()
            for f in (*student.attn, *student.hidden, *proj.parameters()):
                f.grad = None
        return run

    reference = costs_batched(student, teacher, proj)
    agreement = {}
    for name, fn in variants.items():
        other = fn(student, teacher, proj)
        agreement[name] = max(((other[k] - reference[k]).abs().max() / reference[k].abs().max()).item() for k in reference)
    row: dict[str, Any] = {"M": M, "N": N, "B": B, "L": L, "loadavg": C.loadavg(), "max_rel_diff_vs_batched": agreement}
    fwd = C.interleaved({name: forward(fn) for name, fn in variants.items()}, repeats, budget_s=budget_s)
    fb = C.interleaved({name: forward_backward(fn) for name, fn in variants.items()}, repeats, budget_s=budget_s)
    for name in variants:
        row[f"{name}_forward"] = {clock: C.quantiles(fwd[name][clock]) for clock in ("cpu", "wall")}
        row[f"{name}_forward_backward"] = {clock: C.quantiles(fb[name][clock]) for clock in ("cpu", "wall")}
    costs = {k: v.detach().requires_grad_() for k, v in reference.items()}  # a graph like a training step's
    weights = {k: (torch.full((M,), 1 / M), torch.full((N,), 1 / N)) for k in costs}
    solve = C.time_calls(lambda: transport_step(costs, weights), 200 if repeats > 3 else 20, warmup=3, budget_s=budget_s / 4)
    row["transport_and_weights"] = {clock: C.quantiles(solve[clock]) for clock in ("cpu", "wall")}
    row["stacked_mb"] = round(sum(t.numel() * 4 for t in (*student.attn, *teacher.attn, *student.hidden[1:],
                                                          *teacher.hidden[1:])) / 2**20, 1)
    return row


def accuracy(B: int, L: int, heads: int = HEADS) -> dict[str, Any]:
    """Relative error of each D entry against float64 when student layers are close to teacher
    layers (as they are when the student starts from teacher layers, or late in training).

    Attention-like scores (std 5); student layer i = teacher layer 2i+1 plus noise of std
    0.01 / 0.05 / 0.5, so the true costs of those pairs are 1e-4 / 2.5e-3 / 0.25 while the
    squared norms per entry are about 25: ||a||^2 + ||b||^2 - 2 a.b cancels there.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    shape = (B, heads, L, L)
    teacher = torch.randn(6, *shape, generator=g) * 5
    noise = (0.01, 0.05, 0.5)
    student = torch.stack([teacher[2 * i + 1] + n * torch.randn(*shape, generator=g) for i, n in enumerate(noise)])
    truth = torch.stack([torch.stack([((a.double() - b.double()) ** 2).mean() for b in teacher]) for a in student])
    from kdframe_costs.matrices import pairwise_mse
    import torch.nn.functional as F

    variants = {
        "kdframe pairwise_mse": pairwise_mse(student, teacher),
        "lean": lean_pairwise_mse(student, teacher),
        "loop (F.mse_loss per pair)": torch.stack([torch.stack([F.mse_loss(a, b) for b in teacher]) for a in student]),
    }
    out: dict[str, Any] = {"B": B, "L": L, "noise_std": noise, "true_close_pairs": [truth[i, 2 * i + 1].item() for i in range(3)]}
    for name, value in variants.items():
        rel = (value.double() - truth).abs() / truth
        out[name] = {"max_rel_error": rel.max().item(),
                     "close_pairs": [value[i, 2 * i + 1].item() for i in range(3)]}
    return out


def accuracy_real(config: str, length: int) -> dict[str, Any]:
    """The same comparison on real features: the recipe's teacher and student (student taken from
    teacher layers, so some pairs start nearly identical), one synthetic batch, student in eval
    mode (dropout off) and in train mode (as in a step)."""
    import torch
    import torch.nn.functional as F

    from bench_step import load_session, synthetic_batch
    from kdframe_costs.matrices import pairwise_mse

    session, _ = load_session(config)
    host = session.host
    batch = synthetic_batch(session, 32, length, seed=0)
    needs = frozenset({"logits", "hidden", "attn"})
    out: dict[str, Any] = {"config": config, "L": length, "student": session.student.description}
    with torch.no_grad():
        teacher = host.extract_features("teacher", session.teacher, batch, needs)
        for mode in ("eval", "train"):
            session.student.model.train(mode == "train")
            torch.manual_seed(0)
            student = host.extract_features("student", session.student, batch, needs)
            for kind, s_layers, t_layers in (("att", student.attn, teacher.attn),
                                             ("hid", student.hidden[1:], teacher.hidden[1:])):
                truth = torch.stack([torch.stack([((a.double() - b.double()) ** 2).mean() for b in t_layers])
                                     for a in s_layers])
                batched = pairwise_mse(torch.stack(s_layers), torch.stack(t_layers)).double()
                loop = torch.stack([torch.stack([F.mse_loss(a, b) for b in t_layers]) for a in s_layers]).double()
                positive = truth > 0  # identical layers (eval mode) have a true cost of exactly 0
                out[f"{mode} {kind}"] = {
                    "smallest_true_cost": truth.min().item(),
                    "batched_at_true_zero": batched[~positive].tolist(),
                    "batched_max_rel_error": ((batched - truth).abs()[positive] / truth[positive]).max().item(),
                    "batched_max_abs_error": (batched - truth).abs().max().item(),
                    "loop_max_rel_error": ((loop - truth).abs()[positive] / truth[positive]).max().item(),
                    "loop_at_true_zero": loop[~positive].tolist(),
                    "truth": truth.tolist(), "batched": batched.tolist()}
    return out


def markdown(results: dict[str, Any]) -> str:
    def cell(row, name, kind):
        key = f"{name}_{kind}"
        return C.ms(row[key]["cpu"]["median"]) if key in row else "-"

    out = [f"torch threads: {results['threads']}; medians of process CPU time in ms"
           " (transport in microseconds); 'stacked MB' is the size of the features the batched costs stack.", ""]
    for title, rows in (("M x N (B={B}, L={L}, 12 heads, hidden 384)", results["layers"]),
                        ("sequence length (3 x 6, 12 heads, hidden 384)", results["lengths"])):
        out.append(f"### {title.format(B=rows[0]['B'], L=rows[0]['L'])}\n")
        table = []
        for r in rows:
            loop_f = r.get("loop_forward")
            table.append([f"{r['M']}x{r['N']}", r["L"], r["B"], r["stacked_mb"],
                          cell(r, "batched", "forward"), cell(r, "lean", "forward"), cell(r, "loop", "forward"),
                          cell(r, "batched", "forward_backward"), cell(r, "lean", "forward_backward"),
                          cell(r, "loop", "forward_backward"),
                          round(loop_f["cpu"]["median"] / r["batched_forward"]["cpu"]["median"], 2) if loop_f else "-",
                          C.us(r["transport_and_weights"]["cpu"]["median"]), r["loadavg"][0]])
        out.append(C.md_table(["M x N", "L", "B", "stacked MB", "batched fwd", "lean fwd", "loop fwd",
                               "batched fwd+bwd", "lean fwd+bwd", "loop fwd+bwd", "loop/batched fwd",
                               "transport+CA us", "load"], table))
        out.append("")
    acc = results.get("accuracy")
    if acc:
        out.append(f"### Accuracy when student layers are close to teacher layers (3 x 6, B={acc['B']}, L={acc['L']})\n")
        out.append("True D of the three close pairs: " + ", ".join(f"{v:.3g}" for v in acc["true_close_pairs"])
                   + " (noise std " + ", ".join(map(str, acc["noise_std"])) + " on scores of std 5).\n")
        rows = [[name, f"{acc[name]['max_rel_error']:.3g}", ", ".join(f"{v:.3g}" for v in acc[name]["close_pairs"])]
                for name in acc if isinstance(acc[name], dict)]
        out.append(C.md_table(["cost", "max relative error of an entry", "computed D of the close pairs"], rows))
    real = results.get("accuracy_real")
    if real:
        out.append(f"\n### The same on real features: {real['config']} at L={real['L']} ({real['student']})\n")
        rows = [[key, f"{v['smallest_true_cost']:.3g}", f"{v['batched_max_rel_error']:.3g}",
                 f"{v['batched_max_abs_error']:.3g}", ", ".join(f"{x:.3g}" for x in v["batched_at_true_zero"]) or "-",
                 f"{v['loop_max_rel_error']:.3g}", ", ".join(f"{x:.3g}" for x in v["loop_at_true_zero"]) or "-"]
                for key, v in real.items() if isinstance(v, dict)]
        out.append(C.md_table(["student mode, cost", "smallest true D", "batched: max rel error (true D > 0)",
                               "batched: max abs error", "batched where true D = 0", "loop: max rel error",
                               "loop where true D = 0"], rows))
    return "\n".join(out)


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    C.set_threads(args)
    if args.quick:
        layer_sizes, lengths, repeats, budget, b_layers, l_layers = [(2, 6), (3, 6)], [(32, 4)], 3, 1.0, 4, 32
    else:
        layer_sizes, lengths, repeats, budget, b_layers, l_layers = LAYER_SIZES, LENGTHS, 15, 20.0, 8, 64
    results: dict[str, Any] = {"threads": args.threads, "heads": HEADS, "hidden": HIDDEN, "layers": [], "lengths": []}
    for M, N in layer_sizes:
        t0 = time.perf_counter()
        results["layers"].append(measure(M, N, b_layers, l_layers, repeats, budget, loop=True))
        print(f"[bench_scaling] {M}x{N}: {time.perf_counter() - t0:.1f}s, load {C.loadavg()}", flush=True)
    for L, B in lengths:
        t0 = time.perf_counter()
        results["lengths"].append(measure(3, 6, B, L, repeats, budget, loop=True))
        print(f"[bench_scaling] L={L} B={B}: {time.perf_counter() - t0:.1f}s, load {C.loadavg()}", flush=True)
    results["accuracy"] = accuracy(*((4, 32) if args.quick else (32, 128)))
    results["accuracy_real"] = accuracy_real(*(("tiny", 64) if args.quick else ("minilm", 128)))
    C.write_results(args, "bench_scaling", results, markdown(results))


if __name__ == "__main__":
    main()
