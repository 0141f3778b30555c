"""The optimizer phase of a step: AdamW implementations on the student + W_h, with grad clipping.

kdframe.optim.Optimization clips with ``clip_grad_norm_`` every step and builds its AdamW fused
(``kdframe.optim.adamw``); it was torch's default before these measurements, which on the CPU is
the per-parameter loop (foreach is the default on CUDA only). This times one ``clip_grad_norm_ +
step`` for the default, ``foreach=True`` and ``fused=True`` on the same parameters and gradients,
interleaved, and checks that they produce the same update. Student: the 3-layer MiniLM student of recipes/emd_glue.toml
(the smoke_tiny student with --quick); its 30522 x 384 word embeddings are most of its parameters
and get a dense gradient every step.
"""

from __future__ import annotations

import copy
from typing import Any

import _common as C
from bench_step import load_session

VARIANTS = {"default (for-loop on CPU)": {}, "foreach=True": {"foreach": True}, "fused=True": {"fused": True}}


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    C.set_threads(args)
    import torch

    from kdframe.optim import param_groups

    session, _ = load_session("tiny" if args.quick else "minilm")
    hidden = session.student.hidden_size
    torch.manual_seed(0)
    base = [copy.deepcopy(session.student.model), torch.nn.Linear(hidden, session.teacher.hidden_size)]
    grads = [torch.randn_like(p) * 1e-3 for m in base for p in m.parameters()]

    def setup(kwargs: dict[str, Any]):
        modules = [copy.deepcopy(m) for m in base]
        params = [p for m in modules for p in m.parameters()]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = torch.optim.AdamW(param_groups(modules, 0.01), lr=2e-5, **kwargs)

        def step():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return params, step

    arms = {name: setup(kwargs) for name, kwargs in VARIANTS.items()}
    times = C.interleaved({name: arm[1] for name, arm in arms.items()}, 6 if args.quick else 30,
                          warmup=2, budget_s=3 if args.quick else 60)
    reference = arms["default (for-loop on CPU)"][0]
    results: dict[str, Any] = {
        "threads": args.threads, "student": session.student.description,
        "parameters": sum(p.numel() for p in reference),
        "variants": {name: {"time": {clock: C.quantiles(times[name][clock]) for clock in ("cpu", "wall")},
                            "max_abs_param_diff_vs_default": max(float((p - q).abs().max())
                                                                 for p, q in zip(arm[0], reference))}
                     for name, arm in arms.items()},
        "loadavg": C.loadavg(),
    }
    default = results["variants"]["default (for-loop on CPU)"]["time"]["cpu"]["median"]
    rows = [[name, C.ms(v["time"]["cpu"]["median"]), C.ms(v["time"]["wall"]["median"]),
             round(v["time"]["cpu"]["median"] / default, 3), f"{v['max_abs_param_diff_vs_default']:.2g}"]
            for name, v in results["variants"].items()]
    md = (f"Student: {results['student']} plus W_h, {results['parameters']:,} parameters; torch threads {args.threads};"
          f" one clip_grad_norm_ + AdamW.step, medians of {len(times[next(iter(times))]['cpu'])} interleaved rounds;"
          " every variant steps identical copies with identical gradients, so the parameters must match.\n\n"
          + C.md_table(["AdamW", "CPU ms", "wall ms", "CPU / default", "max |param diff| vs default"], rows))
    C.write_results(args, "bench_optimizer", results, md)


if __name__ == "__main__":
    main()
