"""kdframe report on hand-written run and ablation directories: tables, plots, gaps in the data."""

import csv
import json
import statistics

import pytest

from kdframe.errors import KdframeError
from kdframe.report import Run, write_report


def write_run(path, f1_best=0.8, f1_final=0.7, flows=True, seed=1):
    """A finished two-stage run, as the engine writes it (teacher eval, train and dev records)."""
    path.mkdir(parents=True)
    metrics = [{"stage": "teacher", "split": "dev", "step": -1, "kind": "teacher", "f1": 0.9, "accuracy": 0.85}]
    for stage, steps in (("intermediate", (2, 4)), ("prediction", (2, 4))):
        for step in steps:
            metrics.append({"stage": stage, "step": step, "loss": 1.0, "lr": 1e-3})
            metrics.append({"stage": stage, "split": "dev", "step": step, "f1": f1_best - 0.01 * step,
                            "accuracy": 0.6})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics) + '{"torn": ')
    if flows:
        layers = [{"stage": "intermediate", "step": step, "kind": kind, "student": [0.5, 0.5],
                   "teacher": [0.25] * 4, "flow": [[0.25, 0.25, 0, 0], [0, 0, 0.25, 0.25]]}
                  for step in (2, 4) for kind in ("att", "hid")]
        (path / "layer_weights.jsonl").write_text("".join(json.dumps(r) + "\n" for r in layers))
    stage = {"steps": 4, "wall_time_s": 2.0, "steps_per_s": 2.0, "best": {"f1": f1_best}, "final": {"f1": f1_final}}
    summary = {"task": "mrpc", "seed": seed, "main_metric": "f1", "wall_time_s": 5.0,
               "teacher": {"description": "teacher", "params": 4000, "dev": {"f1": 0.9, "accuracy": 0.85},
                           "source": "fine-tuned in this run"},
               "student": {"description": "student", "params": 2000, "best": {"f1": f1_best, "accuracy": 0.6},
                           "best_step": 2, "final": {"f1": f1_final, "accuracy": 0.6}, "selected": "best (step 2)"},
               "stages": {"intermediate": stage, "prediction": stage}}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def write_state(root, cells, name="ablation.json"):
    root.mkdir(exist_ok=True)
    full = [{"task": "mrpc", "recipe": "r.toml", "overrides": [], "dir": f"cells/mrpc/{c['variant']}/seed{c['seed']}",
             "error": None, "wall_time_s": 1.0, **c} for c in cells]
    (root / name).write_text(json.dumps({"grid": "grid.toml", "name": "t", "shard": None, "cells": full}))


def test_stages_are_laid_end_to_end_on_the_dev_curve(tmp_path):
    run = Run.load(write_run(tmp_path / "run"))
    assert run.dev_curve("f1") == {2: pytest.approx(0.78), 4: pytest.approx(0.76),
                                   6: pytest.approx(0.78), 8: pytest.approx(0.76)}


def test_single_run_report(tmp_path):
    run = write_run(tmp_path / "run")
    names = [p.name for p in write_report(run)]
    assert names == ["dev_curve.png", "flow_start.png", "flow_end.png", "layer_weights.png", "report.md"]
    report = (run / "report.md").read_text()
    assert "| student | student | 0.00M | 0.8000 | 2 | 0.7000 | best (step 2) |" in report
    assert "| prediction | 4 | 2.0 | 2.00 | 0.8000 | 0.7000 |" in report


def test_unfinished_run_without_layer_weights_still_reports(tmp_path):
    run = write_run(tmp_path / "run", flows=False)
    (run / "summary.json").unlink()
    assert [p.name for p in write_report(run)] == ["report.md"]
    assert "No summary.json" in (run / "report.md").read_text()


def test_ablation_report_tables_failed_and_missing_cells(tmp_path):
    root = tmp_path / "abl"
    write_run(root / "cells/mrpc/emd/seed1", 0.80, 0.70)
    write_run(root / "cells/mrpc/emd/seed2", 0.84, 0.72, seed=2)
    write_run(root / "cells/mrpc/kd/seed1", 0.90, 0.60, flows=False)
    write_state(root, [{"variant": "emd", "seed": 1, "status": "done"}, {"variant": "emd", "seed": 2, "status": "done"},
                       {"variant": "kd", "seed": 1, "status": "done"},
                       {"variant": "kd", "seed": 2, "status": "failed", "error": "invalid recipe:\n  - stages[0].lr"},
                       {"variant": "pkd", "seed": 1, "status": "running"}])
    names = {p.name for p in write_report(root)}
    assert names == {"results.csv", "report.md", "mrpc_dev_curve.png", "mrpc_emd_flow_start.png",
                     "mrpc_emd_flow_end.png", "mrpc_emd_layer_weights.png"}
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert [(r["variant"], r["seed"], r["status"]) for r in rows] == [
        ("emd", "1", "done"), ("emd", "2", "done"), ("kd", "1", "done"), ("kd", "2", "failed"), ("pkd", "1", "running")]
    assert rows[1]["best_f1"] == "0.84" and rows[1]["teacher_f1"] == "0.9" and rows[3]["best"] == ""
    report = (root / "report.md").read_text()
    assert "| emd | 0.8200 ± 0.0283 | **0.7100 ± 0.0141** | 2 | 0.00M | 0.50 | 4.0 |" in report
    assert "| kd | **0.9000** | 0.6000 | 1 |" in report
    assert "| pkd | - | - | 0 |" in report
    assert "| *teacher* | 0.9000 |  | 1 |" in report
    assert "- `mrpc/kd/seed2`: invalid recipe: - stages[0].lr" in report


def test_shard_state_files_are_reported_together(tmp_path):
    root = tmp_path / "abl"
    write_run(root / "cells/mrpc/emd/seed1")
    write_run(root / "cells/mrpc/emd/seed2", seed=2)
    write_state(root, [{"variant": "emd", "seed": 1, "status": "done"}], "ablation.shard-0-of-2.json")
    write_state(root, [{"variant": "emd", "seed": 2, "status": "done"}], "ablation.shard-1-of-2.json")
    write_report(root)
    assert len(list(csv.DictReader((root / "results.csv").open()))) == 2


def test_neither_kind_of_directory_is_bad_input(tmp_path):
    with pytest.raises(KdframeError, match="neither an ablation directory"):
        write_report(tmp_path)


def test_variants_are_paired_by_seed_against_the_first(tmp_path):
    root = tmp_path / "abl"
    cells = []
    for variant, bests, finals in (("emd", (0.80, 0.82, 0.84), (0.70, 0.72, 0.74)),
                                   ("kd", (0.80, 0.80, 0.80), (0.71, 0.75, 0.74))):
        for seed, (best, final) in enumerate(zip(bests, finals), 1):
            write_run(root / f"cells/mrpc/{variant}/seed{seed}", best, final, seed=seed)
            cells.append({"variant": variant, "seed": seed, "status": "done"})
    write_run(root / "cells/mrpc/pkd/seed4", seed=4)  # no emd run with seed 4 to pair it with
    write_state(root, cells + [{"variant": "pkd", "seed": 4, "status": "done"}])
    write_report(root)
    report = (root / "report.md").read_text()
    # final differences +0.01, +0.03, 0.00: mean 0.0133, sample std 0.0153, t = 0.0133 / (0.0153 / sqrt 3)
    # p: two-sided, t with 2 degrees of freedom: 2 * (1/2 - t / (2 sqrt(2 + t^2))) = 1 - t / sqrt(2 + t^2)
    t = 0.04 / 3 / (statistics.stdev([0.01, 0.03, 0.0]) / 3 ** 0.5)
    p = 1 - t / (2 + t * t) ** 0.5
    assert f"| kd | -0.0200 ± 0.0200 | +0.0133 ± 0.0153 | 2/3 | +1.51 | {p:.3f} |" in report
    assert "with 3 seeds, only |t| > 4.30 gives p < 0.05" in report  # Student's t table, 2 d.o.f.
    assert "| pkd |" in report and report.count("| pkd |") == 1  # in the mean table only
    assert "## Overview" not in report  # one task: its own table says it all


def test_an_ablation_over_several_tasks_starts_with_an_overview(tmp_path):
    root = tmp_path / "abl"
    write_run(root / "cells/mrpc/emd/seed1", 0.80, 0.70)
    write_run(root / "cells/mrpc/emd/seed2", 0.84, 0.74, seed=2)
    write_run(root / "cells/rte/emd/seed1", 0.60, 0.55)
    cells = [{"variant": "emd", "seed": 1, "status": "done"}, {"variant": "emd", "seed": 2, "status": "done"},
             {"variant": "kd", "seed": 1, "status": "pending"}]
    write_state(root, cells + [{"task": "rte", "dir": "cells/rte/emd/seed1", "variant": "emd", "seed": 1,
                                "status": "done"},
                               {"task": "stsb", "dir": "cells/stsb/emd/seed1", "variant": "emd", "seed": 1,
                                "status": "pending"}])  # a task with nothing finished yet
    write_report(root)
    report = (root / "report.md").read_text()
    assert "| variant | mrpc final f1 | rte final f1 | stsb final |" in report
    assert "| emd | 0.7200 ± 0.0283 (n=2) | 0.5500 (n=1) | - |" in report
    assert "| kd | - | - | - |" in report and "| *teacher* | 0.9000 | 0.9000 | - |" in report
    assert report.index("## Overview") < report.index("## mrpc") < report.index("## rte")
