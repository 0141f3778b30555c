"""The benchmark scripts run in --quick mode (seconds): they stay runnable as the engine changes.

bench_step.py times kdframe.step.train_step itself, per phase, through the step's ``phase`` markers
(nothing copied), so this fails when the step's API or phases change under it. Numbers are not
asserted (docs/performance.md).
"""

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmarks_run_in_quick_mode(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = {p.name for p in tmp_path.rglob("*.json")}
    assert {"bench_step.json", "bench_scaling.json", "bench_transport.json", "bench_capture.json",
            "bench_data.json"} <= written
    step = json.loads(next(tmp_path.rglob("bench_step.json")).read_text())
    for run in step["runs"].values():  # the peer's TinyBERT-style step ran beside kdframe's
        assert run["strategies"]["peer-tinybert"]["cpu"]["total"]["median"] > 0
        assert run["ratios"]["cpu"]["one_to_one_over_peer"]["median"] > 0
