"""``kdframe report``: tables and plots for an ablation directory or a single run directory.

An ablation directory (it holds ablation.json, or one state file per shard) gets ``results.csv``
(one row per cell), ``report.md`` (per task: mean ± std over seeds of each variant's best and final
dev score, and each variant's difference to the first, paired by seed) and ``plots/``: ``<task>_dev_curve.png`` and, per variant that logged layer flows,
``<task>_<variant>_flow_start.png``, ``_flow_end.png`` and ``_layer_weights.png``. A run directory
(it holds summary.json or metrics.jsonl) gets ``report.md`` and the same plots in its ``plots/``.

Missing or partial data (a failed cell, a run still going, no layer_weights.jsonl) leaves gaps in
the tables and fewer plots, never an error.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

import attrs
from matplotlib.figure import Figure
from scipy.stats import t as student_t

from kdframe.errors import KdframeError
from kdframe.fileio import iter_jsonl, read_json
from kdframe.grid import cell_label, state_files
from kdframe.rundir import LAYER_WEIGHTS, METRICS, SUMMARY, TEACHER, RunDir

SELECTION_NOTE = ("*best* is the best dev score seen during training (what best-dev checkpoint selection keeps);"
                  " choosing on the same dev set it is scored on inflates it, so *final* (after the last step)"
                  " is shown too.")


@attrs.define
class Run:
    """What a run directory holds, whatever of it exists."""

    path: Path
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    layers: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> "Run":
        return cls(path, read_json(path / SUMMARY), list(iter_jsonl(path / METRICS)),
                   [r for r in iter_jsonl(path / LAYER_WEIGHTS) if r.get("flow")])

    def student(self, part: str) -> dict[str, float]:
        """The student's ``best`` or ``final`` metrics ({} if the run did not finish)."""
        return ((self.summary or {}).get("student") or {}).get(part) or {}

    @property
    def teacher(self) -> dict[str, Any] | None:
        return (self.summary or {}).get("teacher")

    def stage_offsets(self) -> dict[str, int]:
        """Each student stage counts steps from 0; offsets put the stages on one axis, in run order."""
        offsets: dict[str, int] = {}
        last: dict[str, int] = {}
        for record in self.metrics:
            stage = record.get("stage")
            if stage is None or stage == TEACHER:
                continue
            offsets.setdefault(stage, sum(last.values()))
            last[stage] = max(last.get(stage, 0), record.get("step", 0))
        return offsets

    def dev_curve(self, metric: str) -> dict[int, float]:
        offsets = self.stage_offsets()
        return {offsets[r["stage"]] + r["step"]: r[metric] for r in self.metrics
                if r.get("split") == "dev" and r.get("stage") in offsets and metric in r}

    def training_time(self) -> float | None:
        """Wall time of the student's stages (the teacher's fine-tuning excluded: only one cell pays it)."""
        stages = (self.summary or {}).get("stages") or {}
        return sum(s.get("wall_time_s") or 0.0 for s in stages.values()) if stages else None


# -- plots --------------------------------------------------------------------------------------

def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_dev_curves(curves: dict[str, list[dict[int, float]]], metric: str, teacher: float | None,
                    title: str, path: Path) -> Path | None:
    """Dev metric over steps, one line per label (the mean over its runs at each step)."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, runs in curves.items():
        runs = [c for c in runs if c]
        if runs:
            steps = sorted(set().union(*runs))
            ax.plot(steps, [statistics.fmean(c[s] for c in runs if s in c) for s in steps], marker=".",
                    label=f"{label} (n={len(runs)})" if len(runs) > 1 else label)
    if not ax.lines:
        return None
    if teacher is not None:
        ax.axhline(teacher, linestyle="--", color="gray", label="teacher")
    ax.set(title=title, xlabel="step (stages in sequence)", ylabel=f"dev {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_flows(layers: list[dict[str, Any]], end: bool, title: str, path: Path) -> Path | None:
    """Flow heatmaps (student layer x teacher layer) of the first or last logged record of each kind."""
    chosen: dict[str, dict[str, Any]] = {}
    for record in layers:
        if end or record["kind"] not in chosen:
            chosen[record["kind"]] = record
    if not chosen:
        return None
    fig = Figure(figsize=(4.6 * len(chosen), 3.8), layout="constrained")
    for ax, (kind, record) in zip(fig.subplots(1, len(chosen), squeeze=False)[0], sorted(chosen.items())):
        flow = record["flow"]
        rows, cols = len(flow), len(flow[0])
        image = ax.imshow(flow, cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax)
        ax.set(title=f"{kind} ({record['stage']} step {record['step']})", xlabel="teacher layer",
               ylabel="student layer", xticks=range(cols), xticklabels=range(1, cols + 1),
               yticks=range(rows), yticklabels=range(1, rows + 1))
        if rows * cols <= 72:  # small enough to print the values
            high = max(map(max, flow)) * 0.6
            for i in range(rows):
                for j in range(cols):
                    ax.text(j, i, f"{flow[i][j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if flow[i][j] > high else "white")
    fig.suptitle(title)
    return _save(fig, path)


def plot_layer_weights(layers: list[dict[str, Any]], offsets: dict[str, int], title: str,
                       path: Path) -> Path | None:
    """Student and teacher layer weights over steps, one line per layer, one row per kind."""
    kinds = sorted({r["kind"] for r in layers})
    if not kinds:
        return None
    fig = Figure(figsize=(11, 3.2 * len(kinds)), layout="constrained")
    for (left, right), kind in zip(fig.subplots(len(kinds), 2, squeeze=False), kinds):
        records = [r for r in layers if r["kind"] == kind]
        steps = [offsets.get(r["stage"], 0) + r["step"] for r in records]
        for ax, side in ((left, "student"), (right, "teacher")):
            for layer in range(len(records[0][side])):
                ax.plot(steps, [r[side][layer] for r in records], label=f"layer {layer + 1}")
            ax.set(title=f"{kind}: {side} layer weights", xlabel="step", ylabel="weight")
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    return _save(fig, path)


def _run_plots(run: Run, prefix: str, title: str, plots: Path) -> list[Path]:
    """Flow and layer-weight plots of one run, named ``<prefix>_flow_start.png`` and so on."""
    written = [plot_flows(run.layers, False, f"{title}: flow at the start", plots / f"{prefix}flow_start.png"),
               plot_flows(run.layers, True, f"{title}: flow at the end", plots / f"{prefix}flow_end.png"),
               plot_layer_weights(run.layers, run.stage_offsets(), f"{title}: layer weights",
                                  plots / f"{prefix}layer_weights.png")]
    return [p for p in written if p is not None]


# -- tables -------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float | None] | None:
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell_text(stats: tuple[float, float | None] | None, bold: bool = False) -> str:
    if stats is None:
        return "-"
    mean, std = stats
    text = f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
    return f"**{text}**" if bold else text


def _millions(count: float | None) -> str:
    return f"{count / 1e6:.2f}M" if count else "-"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _csv_row(cell: dict[str, Any], run: Run) -> dict[str, Any]:
    row: dict[str, Any] = {k: cell.get(k) for k in ("task", "variant", "seed", "status")}
    summary = run.summary or {}
    metric = summary.get("main_metric")
    best, final = run.student("best"), run.student("final")
    student = summary.get("student") or {}
    row.update(main_metric=metric, best=best.get(metric), final=final.get(metric), best_step=student.get("best_step"))
    row.update({f"best_{k}": v for k, v in best.items()})
    row.update({f"final_{k}": v for k, v in final.items()})
    row.update({f"teacher_{k}": v for k, v in (run.teacher or {}).get("dev", {}).items()})
    row.update(wall_time_s=summary.get("wall_time_s", cell.get("wall_time_s")), student_params=student.get("params"),
               teacher_params=(run.teacher or {}).get("params"), error=cell.get("error"))
    return row


def _write_csv(root: Path, rows: list[dict[str, Any]]) -> Path:
    fixed = ["task", "variant", "seed", "status", "main_metric", "best", "final", "best_step"]
    tail = ["wall_time_s", "student_params", "teacher_params", "error"]
    metrics = sorted({k for row in rows for k in row} - set(fixed) - set(tail))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fixed + metrics + tail, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    RunDir(root).write_text("results.csv", buffer.getvalue())
    return root / "results.csv"


def _teacher_scores(runs: list[Run], metric: str) -> list[float]:
    """The distinct teacher dev scores of these runs: cells share their task's teacher, so each counts once."""
    return sorted({run.teacher["dev"][metric] for run in runs if run.teacher and metric in run.teacher.get("dev", {})})


def _paired_section(metric: str, variants: list[str], entries: list[tuple[dict[str, Any], Run]]) -> list[str]:
    """Each variant against the grid's first, paired by seed.

    Cells with the same seed share the data order and the student's initialisation, so the
    per-seed difference removes much of the seed-to-seed spread that the mean ± std table mixes in.
    """
    scores = {(cell["variant"], cell["seed"]): run for cell, run in entries if run.summary}
    reference = variants[0]
    rows = []
    paired: set[int] = set()  # how many seeds each row pairs
    for variant in variants[1:]:
        seeds = [seed for (v, seed) in scores if v == variant and (reference, seed) in scores]
        if not seeds:
            continue
        paired.add(len(seeds))
        diffs = {part: [scores[variant, seed].student(part).get(metric, float("nan"))
                        - scores[reference, seed].student(part).get(metric, float("nan")) for seed in seeds]
                 for part in ("best", "final")}
        stats = {part: _mean_std(d) for part, d in diffs.items()}
        mean, std = stats["final"]
        t = mean / (std / len(seeds) ** 0.5) if std else None
        p = 2 * student_t.sf(abs(t), len(seeds) - 1) if t is not None else None
        rows.append([variant, *(f"{m:+.4f}" + (f" ± {sd:.4f}" if sd is not None else "") for m, sd in stats.values()),
                     f"{sum(d > 0 for d in diffs['final'])}/{len(seeds)}", f"{t:+.2f}" if t is not None else "-",
                     f"{p:.3f}" if p is not None else "-"])
    if not rows:
        return []
    critical = (f": with {n} seeds, only |t| > {student_t.ppf(0.975, n - 1):.2f} gives p < 0.05"
                if len(paired) == 1 and (n := paired.pop()) > 1 else "")
    return [f"Paired by seed against **{reference}** (variant minus {reference}, dev {metric}; same seed = same"
            " data order and student initialisation). t = mean / (std / sqrt(n)) of the final differences;"
            f" p is its two-sided paired t-test (n - 1 degrees of freedom){critical}.", "",
            *_markdown_table(["variant", f"Δ best {metric}", f"Δ final {metric}",
                              "seeds with higher final", "t (final)", "p (final)"], rows)]


# -- an ablation directory ----------------------------------------------------------------------

def _task_section(task: str, entries: list[tuple[dict[str, Any], Run]], root: Path) -> tuple[list[str], list[Path]]:
    """One task's table and plots; ``entries`` are its cells in grid order."""
    plots = root / "plots"
    metric = next((run.summary["main_metric"] for _, run in entries if run.summary), None)
    variants = list(dict.fromkeys(cell["variant"] for cell, _ in entries))
    by_variant = {v: [run for cell, run in entries if cell["variant"] == v and run.summary] for v in variants}
    teachers = [run.teacher for _, run in entries if run.teacher]
    teacher_params = teachers[0]["params"] if teachers else None
    lines = [f"## {task}", ""]
    if metric is None:
        return lines + ["No cell of this task finished.", ""], []

    stats = {v: {part: _mean_std([r.student(part)[metric] for r in runs if metric in r.student(part)])
                 for part in ("best", "final")} for v, runs in by_variant.items()}
    top = {part: max((s[part][0] for s in stats.values() if s[part]), default=None) for part in ("best", "final")}
    rows = []
    for variant, runs in by_variant.items():
        params = runs[0].summary["student"]["params"] if runs else None
        times = [t for t in (r.training_time() for r in runs) if t is not None]
        rows.append([variant, *(_cell_text(stats[variant][p], stats[variant][p] is not None
                                           and stats[variant][p][0] == top[p]) for p in ("best", "final")),
                     str(len(runs)), _millions(params),
                     f"{params / teacher_params:.2f}" if params and teacher_params else "-",
                     f"{statistics.fmean(times):.1f}" if times else "-"])
    teacher_scores = _teacher_scores([run for _, run in entries], metric)
    teacher_score = _mean_std(teacher_scores)
    if teacher_score is not None:
        rows.append(["*teacher*", _cell_text(teacher_score), "", str(len(teacher_scores)), _millions(teacher_params),
                     "1.00", ""])
    header = ["variant", f"best dev {metric}", f"final dev {metric}", "n", "params", "params / teacher",
              "training time (s)"]
    lines += _markdown_table(header, rows)
    lines += _paired_section(metric, variants, entries)

    written = []
    curve = plot_dev_curves({v: [r.dev_curve(metric) for r in runs] for v, runs in by_variant.items()}, metric,
                            teacher_score[0] if teacher_score else None, f"{task}: dev {metric} (mean over seeds)",
                            plots / f"{task}_dev_curve.png")
    if curve:
        written.append(curve)
        lines += [f"![{task} dev curve](plots/{curve.name})", ""]
    for variant in variants:
        # One seed's flows stand for the variant: the first finished seed that logged any.
        run = next((r for r in by_variant[variant] if r.layers), None)
        if run is None:
            continue
        seed = run.summary.get("seed")
        found = _run_plots(run, f"{task}_{variant}_", f"{task} {variant} (seed {seed})", plots)
        written += found
        lines += [f"{variant} (seed {seed}): " + ", ".join(f"[{p.stem.removeprefix(f'{task}_{variant}_')}](plots/{p.name})"
                                                           for p in found), ""]
    return lines, written


def _overview(tasks: list[str], entries: list[tuple[dict[str, Any], Run]]) -> list[str]:
    """Variants x tasks: each task's main metric, final, mean ± std over the finished seeds."""
    finished = [(cell, run) for cell, run in entries if run.summary]
    metrics = {cell["task"]: run.summary["main_metric"] for cell, run in finished}
    variants = list(dict.fromkeys(cell["variant"] for cell, _ in entries))
    rows = []
    for variant in variants:
        row = [variant]
        for task in tasks:
            values = [run.student("final").get(metrics.get(task)) for cell, run in finished
                      if (cell["task"], cell["variant"]) == (task, variant)]
            found = [v for v in values if v is not None]
            row.append(_cell_text(_mean_std(found)) + (f" (n={len(found)})" if found else ""))
        rows.append(row)
    teacher = ["*teacher*"]
    for task in tasks:
        runs = [run for cell, run in finished if cell["task"] == task]
        teacher.append(_cell_text(_mean_std(_teacher_scores(runs, metrics[task]))) if runs else "-")
    header = ["variant", *(f"{task} final {metrics.get(task, '')}".rstrip() for task in tasks)]
    return ["## Overview: final dev score per task", "", *_markdown_table(header, rows + [teacher])]


def _ablation_report(root: Path, files: list[Path]) -> list[Path]:
    states = [s for s in (read_json(f) for f in files) if isinstance(s, dict)]
    cells = [cell for state in states for cell in state.get("cells", [])]
    entries = [(cell, Run.load(root / cell["dir"])) for cell in cells]
    written = [_write_csv(root, [_csv_row(cell, run) for cell, run in entries])]

    counts = {s: sum(c.get("status") == s for c in cells) for s in ("done", "failed", "running", "pending")}
    name = states[0].get("name", root.name) if states else root.name
    lines = [f"# Ablation {name}", "", f"Grid: `{states[0].get('grid') if states else '?'}`; state: "
             + ", ".join(f"`{f.name}`" for f in files) + ".", "",
             f"{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".", "",
             SELECTION_NOTE + " Mean ± sample standard deviation over seeds; n counts finished seeds."
             " Training time is the student's stages only (one cell per task also fine-tunes the teacher).", ""]
    tasks = list(dict.fromkeys(cell["task"] for cell in cells))
    if len(tasks) > 1:
        lines += _overview(tasks, entries)
    for task in tasks:
        section, plots = _task_section(task, [(c, r) for c, r in entries if c["task"] == task], root)
        lines += section
        written += plots
    failed = [c for c in cells if c.get("status") == "failed"]
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- `{cell_label(c)}`: " + " ".join(str(c.get("error")).split()) for c in failed]
        lines += ["", "Fix the cause and rerun with `--resume`: done cells are kept, failed ones run again.", ""]
    RunDir(root).write_text("report.md", "\n".join(lines))
    return written + [root / "report.md"]


# -- a run directory ----------------------------------------------------------------------------

def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _run_report(root: Path) -> list[Path]:
    run = Run.load(root)
    summary = run.summary or {}
    metric = summary.get("main_metric")
    lines = [f"# Run {root.resolve().name}", ""]
    written: list[Path] = []
    if not summary:
        lines += ["No summary.json: the run has not finished (or failed); plots show what was logged.", ""]
    else:
        student = summary["student"]
        lines += [f"Task {summary['task']}, seed {summary['seed']}, main metric {metric};"
                  f" {summary['wall_time_s']:.1f}s in all. " + SELECTION_NOTE, ""]
        rows = [["student", student["description"], _millions(student["params"]), _fmt(run.student("best").get(metric)),
                 _fmt(student["best_step"], ""), _fmt(run.student("final").get(metric)), student["selected"]]]
        if run.teacher:
            rows.append(["teacher", run.teacher["description"], _millions(run.teacher["params"]),
                         _fmt(run.teacher["dev"].get(metric)), "", "", run.teacher["source"]])
        lines += _markdown_table(["", "model", "params", f"best dev {metric}", "best step", f"final dev {metric}",
                                  "selected / source"], rows)
        lines += _markdown_table(["stage", "steps", "wall time (s)", "steps/s", f"best {metric}", f"final {metric}"],
                                 [[name, _fmt(s.get("steps"), ""), _fmt(s.get("wall_time_s"), ".1f"), _fmt(s.get("steps_per_s"), ".2f"),
                                   _fmt((s.get("best") or {}).get(metric)), _fmt((s.get("final") or {}).get(metric))]
                                  for name, s in summary["stages"].items()])
        teacher = (run.teacher or {}).get("dev", {}).get(metric)
        curve = plot_dev_curves({"student": [run.dev_curve(metric)]}, metric, teacher, f"dev {metric}",
                                root / "plots" / "dev_curve.png")
        written += [curve] if curve else []
    written += _run_plots(run, "", root.resolve().name, root / "plots")
    lines += [f"![{p.stem}](plots/{p.name})" for p in written] + [""]
    RunDir(root).write_text("report.md", "\n".join(lines))
    return written + [root / "report.md"]


def write_report(directory: str | Path) -> list[Path]:
    """Write the report of an ablation or run directory; return the files written."""
    root = Path(directory)
    files = state_files(root)
    if files:
        return _ablation_report(root, files)
    if (root / SUMMARY).is_file() or (root / METRICS).is_file():
        return _run_report(root)
    raise KdframeError(f"{root} is neither an ablation directory (no ablation.json) nor a run directory"
                       " (no summary.json or metrics.jsonl)")
