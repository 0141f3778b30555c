"""Cost of capturing pre-softmax attention scores: teacher forward with capture vs plain forwards.

The teacher (MiniLM-L6 from recipes/emd_glue.toml; the smoke_tiny teacher with --quick) runs in
eval mode under no_grad, as kdframe.step runs it, on synthetic batches of exactly L tokens
(batch 32), through kdframe_hf.capture.extract_features -- the code a training step calls:

- ``sdpa``: needs = {logits}: the model's own (sdpa) attention, what KD and fine-tuning run;
- ``sdpa+hidden``: needs = {logits, hidden};
- ``eager+hidden``: the same with transformers' eager attention (scores materialised, not kept);
- ``capture``: needs = {logits, hidden, attn}: kdframe's capturing attention, what EMD,
  one-to-one and uniform run (the target compares this with ``sdpa``);
- ``capture attn only``: needs = {logits, attn}.

Batches: ``padded`` (one example of length L, the others 50-100% of L, as dynamic padding gives)
and ``full`` (no padding; sdpa may then skip the mask). The student (train mode, with grad) is
also timed for forward + backward of a loss on the logits under sdpa and under capture.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import _common as C
from bench_step import load_session, synthetic_batch

LEAN = "bench_capture_lean"


def register_lean_capture() -> None:
    """A candidate replacement for kdframe_hf.capture.capture_attention (benchmark-local): the same
    recorded scores with fewer full passes over the (B, h, L, L) scores. The scale goes on the
    query (B, h, L, d_head) before the product, the mask is added in place, and the masked keys are
    zeroed in place after the softmax has read the scores (softmax's backward needs its output,
    not its input, so this is legal under autograd), instead of into a new tensor."""
    import torch
    from torch import nn
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from kdframe_hf import capture

    def lean_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if scaling is None:
            scaling = query.size(-1) ** -0.5
        scores = torch.matmul(query * scaling, key.transpose(2, 3))
        if attention_mask is not None:
            scores.add_(attention_mask)
        weights = nn.functional.softmax(scores, dim=-1)
        recorded = capture._scores.get()
        if recorded is not None:
            if attention_mask is not None:
                scores.masked_fill_(attention_mask <= capture.MASKED, 0.0)
            recorded.append(scores)
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
        output = torch.matmul(weights, value).transpose(1, 2).contiguous()
        return output, weights

    AttentionInterface.register(LEAN, lean_attention)
    AttentionMaskInterface.register(LEAN, eager_mask)


@contextlib.contextmanager
def lean_capturing(model):
    from kdframe_hf import capture

    scores: list = []
    token = capture._scores.set(scores)
    try:
        with C.attn_implementation(model, LEAN):
            yield scores
    finally:
        capture._scores.reset(token)


def lean_features(model, batch, needs):
    """kdframe_hf.capture.extract_features with the lean attention (teacher side)."""
    from kdframe.api import Features

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if getattr(model.config, "type_vocab_size", 0) > 1:
        inputs["token_type_ids"] = batch["token_type_ids"]
    with lean_capturing(model) as scores:
        output = model(**inputs, output_hidden_states="hidden" in needs)
    return Features(logits=output.logits, mask=batch["attention_mask"],
                    hidden=tuple(output.hidden_states) if "hidden" in needs else None, attn=tuple(scores))


def check_lean(model, batch) -> dict[str, float]:
    """The lean capture must record what kdframe's capture records."""
    import torch

    from kdframe_hf.capture import extract_features

    needs = frozenset({"logits", "hidden", "attn"})
    with torch.no_grad():
        ref = extract_features(model, batch, needs)
        new = lean_features(model, batch, needs)
    return {"max_abs_score_diff": max(float((a - b).abs().max()) for a, b in zip(ref.attn, new.attn)),
            "max_abs_score": max(float(a.abs().max()) for a in ref.attn),
            "max_abs_logit_diff": float((ref.logits - new.logits).abs().max())}


VARIANTS = {
    "sdpa": (frozenset({"logits"}), None),
    "sdpa+hidden": (frozenset({"logits", "hidden"}), None),
    "eager+hidden": (frozenset({"logits", "hidden"}), "eager"),
    "capture": (frozenset({"logits", "hidden", "attn"}), None),
    "capture attn only": (frozenset({"logits", "attn"}), None),
    "lean capture (prototype)": (frozenset({"logits", "hidden", "attn"}), LEAN),
}


def teacher_forward(model, batch, needs, impl):
    import torch

    from kdframe_hf.capture import extract_features

    if impl == LEAN:
        def run():
            with torch.no_grad():
                lean_features(model, batch, needs)
        return run

    def run():
        with torch.no_grad(), C.attn_implementation(model, impl):
            extract_features(model, batch, needs)
    return run


def student_step(model, batch, needs):
    from kdframe_hf.capture import extract_features

    def run():
        features = extract_features(model, batch, needs)
        features.logits.float().sum().backward()
        model.zero_grad(set_to_none=True)
    return run


def measure(session, length: int, batch_size: int, rounds: int, budget: float) -> dict[str, Any]:
    teacher = session.teacher.model.eval()
    student = session.student.model.train()
    out: dict[str, Any] = {"L": length, "B": batch_size}
    for padding in ("padded", "full"):
        batch = synthetic_batch(session, batch_size, length, seed=0, padded=padding == "padded")
        loads = [C.loadavg()]
        fns = {name: teacher_forward(teacher, batch, needs, impl) for name, (needs, impl) in VARIANTS.items()}
        times = C.interleaved(fns, rounds, budget_s=budget)
        loads.append(C.loadavg())
        res: dict[str, Any] = {"loadavg": loads, "teacher": {}, "ratios": {}, "lean_check": check_lean(teacher, batch)}
        for name in VARIANTS:
            res["teacher"][name] = {clock: C.quantiles(times[name][clock]) for clock in ("cpu", "wall")}
        for clock in ("cpu", "wall"):
            per_round = lambda a, b: C.quantiles([x / y for x, y in zip(times[a][clock], times[b][clock])])  # noqa: E731
            res["ratios"][clock] = {
                "capture_over_sdpa": per_round("capture", "sdpa"),
                "capture_over_sdpa_hidden": per_round("capture", "sdpa+hidden"),
                "eager_hidden_over_sdpa_hidden": per_round("eager+hidden", "sdpa+hidden"),
                "capture_over_eager_hidden": per_round("capture", "eager+hidden"),
                "capture_attn_only_over_sdpa": per_round("capture attn only", "sdpa"),
                "lean_capture_over_sdpa": per_round("lean capture (prototype)", "sdpa"),
            }
        if padding == "padded":
            s_fns = {"student sdpa fwd+bwd": student_step(student, batch, frozenset({"logits"})),
                     "student capture fwd+bwd": student_step(student, batch, frozenset({"logits", "hidden", "attn"}))}
            s_times = C.interleaved(s_fns, max(3, rounds // 2), budget_s=budget / 2)
            res["student"] = {name: {clock: C.quantiles(s_times[name][clock]) for clock in ("cpu", "wall")}
                              for name in s_fns}
            res["ratios"]["cpu"]["student_capture_over_sdpa"] = C.quantiles(
                [x / y for x, y in zip(s_times["student capture fwd+bwd"]["cpu"], s_times["student sdpa fwd+bwd"]["cpu"])])
        out[padding] = res
    return out


def markdown(results: dict[str, Any]) -> str:
    out = [f"Teacher: {results['teacher']}; torch threads {results['threads']}; medians of process CPU time in ms;"
           " ratios are medians of per-round ratios (variants interleaved). Target: capture <= 1.10 x sdpa.", ""]
    headers = ["L", "batch", *VARIANTS, "capture / sdpa", "capture / sdpa+hidden", "eager / sdpa (both +hidden)",
               "capture / eager+hidden", "lean capture / sdpa", "student fwd+bwd capture / sdpa", "load"]
    rows = []
    for r in results["runs"]:
        for padding in ("padded", "full"):
            res = r[padding]
            ratio = res["ratios"]["cpu"]
            student = ratio.get("student_capture_over_sdpa")
            rows.append([r["L"], f"{r['B']} {padding}", *[C.ms(res["teacher"][n]["cpu"]["median"]) for n in VARIANTS],
                         round(ratio["capture_over_sdpa"]["median"], 3), round(ratio["capture_over_sdpa_hidden"]["median"], 3),
                         round(ratio["eager_hidden_over_sdpa_hidden"]["median"], 3),
                         round(ratio["capture_over_eager_hidden"]["median"], 3),
                         round(ratio["lean_capture_over_sdpa"]["median"], 3),
                         round(student["median"], 3) if student else "-", res["loadavg"][0][0]])
    out.append(C.md_table(headers, rows))
    worst = max(r[p]["lean_check"]["max_abs_score_diff"] for r in results["runs"] for p in ("padded", "full"))
    out.append(f"\nThe lean capture (prototype) records the same scores as kdframe's capture to {worst:.2g}"
               " (largest absolute difference; rounding of the scale before vs after the product).")
    return "\n".join(out)


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    C.set_threads(args)
    config = "tiny" if args.quick else "minilm"
    session, _ = load_session(config)
    register_lean_capture()
    lengths = [64] if args.quick else [64, 128]
    results: dict[str, Any] = {"threads": args.threads, "teacher": session.teacher.description, "runs": []}
    for length in lengths:
        t0 = time.perf_counter()
        rounds = 4 if args.quick else (10 if length <= 64 else 6)
        budget = 3.0 if args.quick else 80.0
        results["runs"].append(measure(session, length, 32, rounds, budget))
        print(f"[bench_capture] L={length}: {time.perf_counter() - t0:.1f}s, load {C.loadavg()}", flush=True)
    C.write_results(args, "bench_capture", results, markdown(results))


if __name__ == "__main__":
    main()
