"""Data parallel through torch.distributed: 2 CPU processes (gloo) train what 1 process trains.

The same recipe runs once in one process and once under ``torchrun --nproc_per_node 2``. Dropout
is off (each process would draw its own masks), and 61 examples in batches of 15 make every
global batch split unevenly (8 + 7 examples) and leave a last batch of one example, where the
second process has nothing to do and joins the collectives with weight 0. The two runs must
agree up to float rounding (the gradient sum is reduced in another order), and the 2-process run
must write one set of files.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed

from conftest import FIXTURES, ROOT, run_cli

SMOKE = str(ROOT / "recipes" / "smoke_tiny.toml")
SETS = [
    "teacher.config.hidden_dropout_prob=0.0",
    "teacher.config.attention_probs_dropout_prob=0.0",  # the student copies the teacher's config
    "data.train_limit=61",
    "teacher.train.batch_size=15",
    "stages[0].batch_size=15",
]
ATOL = 1e-4

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def set_args():
    return [arg for value in SETS for arg in ("--set", value)]


def launch(*args, nproc=2, env=None, cwd=ROOT):
    """``torchrun --standalone --nproc_per_node N -m kdframe.cli ARGS`` (standalone: a free port)."""
    full_env = dict(os.environ, PYTHONPATH=str(FIXTURES), OMP_NUM_THREADS="1", **(env or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "kdframe.cli", *args]
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_close_records(got, want, where):
    assert len(got) == len(want), where
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), where
        for key, value in b.items():
            if isinstance(value, (float, list)):
                assert torch.allclose(torch.tensor(a[key], dtype=torch.float64), torch.tensor(value, dtype=torch.float64),
                                      atol=ATOL), f"{where}: {key} at {b.get('stage')} step {b.get('step')}"
            else:
                assert a[key] == value, f"{where}: {key}"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The recipe run in one process: the run directory every launch must reproduce."""
    one = tmp_path_factory.mktemp("one") / "run"
    # an own teacher cache, so that the run fine-tunes the teacher (that stage runs data parallel too)
    single = run_cli("run", SMOKE, "--out", str(one), "--progress", "off", *set_args(),
                     env={"KDFRAME_CACHE": str(one.parent / "cache"), "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    return one


def test_two_processes_train_what_one_process_trains(one_process, tmp_path):
    one, two = one_process, tmp_path / "two"
    double = launch("run", SMOKE, "--out", str(two), "--progress", "plain", *set_args(),
                    env={"KDFRAME_CACHE": str(tmp_path / "cache-two")})
    assert double.returncode == 0, double.stderr
    assert_same_run(two, one)
    assert double.stderr.count("[distil] done") == 1


def test_two_nodes_of_one_process_train_what_one_process_trains(one_process, tmp_path):
    """A multi-node launch as users start one (docs/guide.md): one torchrun per node, ``--nnodes 2``,
    each with its ``--node-rank`` and the master's address; here both nodes are this machine, and
    ``--out`` and the cache are the shared storage they need."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(FIXTURES), OMP_NUM_THREADS="1", KDFRAME_CACHE=str(tmp_path / "cache"))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "kdframe.cli", "run", SMOKE, "--out", str(tmp_path / "run"), "--progress", "plain",
                               *set_args()], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert outputs[0][1].count("[distil] done") == 1 and "[distil] done" not in outputs[1][1]  # node 1 is quiet
    assert_same_run(tmp_path / "run", one_process)


def assert_same_run(two, one):
    """Run directory ``two`` (several processes) holds what ``one`` (one process) holds."""
    # one set of files, written once: the same names, no duplicated log lines, one progress stream
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in ("metrics.jsonl", "layer_weights.jsonl"):
        lines = (two / name).read_text().splitlines()
        assert len(lines) == len(set(lines)) == len((one / name).read_text().splitlines()), name
    assert (two / "recipe.resolved.toml").read_text() == (one / "recipe.resolved.toml").read_text()

    for name in ("teacher.pt", "student.pt"):
        want, got = (torch.load(d / name, weights_only=True) for d in (one, two))
        assert want.keys() == got.keys()
        for key in want:
            assert torch.allclose(got[key].double(), want[key].double(), atol=ATOL), f"{name}: {key}"
    assert_close_records(read_jsonl(two / "layer_weights.jsonl"), read_jsonl(one / "layer_weights.jsonl"),
                         "layer_weights.jsonl")
    assert_close_records(read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl"), "metrics.jsonl")
    summaries = [json.loads((d / "summary.json").read_text()) for d in (one, two)]
    assert summaries[1]["student"]["best"] == summaries[0]["student"]["best"]
    assert summaries[1]["stages"]["distil"]["steps"] == summaries[0]["stages"]["distil"]["steps"] == 10


def test_multi_process_run_needs_out(tmp_path):
    result = launch("run", SMOKE, "--progress", "off", env={"KDFRAME_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    assert result.returncode != 0
    assert "needs --out DIR (or --resume DIR)" in result.stderr
    assert "exitcode  : 2" in result.stderr  # each process exits 2; torchrun reports it and exits 1
    assert not (tmp_path / "runs").exists()  # no process made a run directory of its own
