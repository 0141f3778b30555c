"""``student.head_bias``: a new regression head starts at the training labels' mean; a trained head,
a classification head and ``"as-loaded"`` are left alone."""

import csv
import statistics
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SHARED_GLUE
from kdframe.session import prepare

SMOKE = str(ROOT / "recipes" / "smoke_tiny.toml")
STSB = ['data.task="stsb"', f'data.glue_dir="{SHARED_GLUE}"']

pytestmark = pytest.mark.skipif(not (SHARED_GLUE / "STS-B").is_dir(), reason="needs the shared GLUE copy")


def gold_mean(limit):
    """The mean score of the first ``limit`` STS-B training pairs, read from the TSV directly."""
    with (SHARED_GLUE / "STS-B" / "train.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return statistics.fmean(float(row["score"]) for row in rows)


def head(session):
    return session.student.model.classifier


def test_a_new_regression_head_starts_at_the_label_mean():
    session = prepare(SMOKE, STSB)
    assert session.student.fresh_head is head(session)
    assert head(session).bias.item() == pytest.approx(gold_mean(64), abs=1e-6)
    assert "bias at the training labels' mean" in session.student.description
    # only the bias: the weights are the loader's (the same seed without the option)
    plain = prepare(SMOKE, [*STSB, 'student.head_bias="as-loaded"'])
    assert head(plain).bias.item() == 0.0
    assert torch.equal(head(plain).weight, head(session).weight)
    # the first predictions sit at the mean, not at 0
    batch = torch.tensor([session.train.table.column("input_ids")[0].as_py()])
    with torch.no_grad():
        start = session.student.model(input_ids=batch).logits.item()
    assert abs(start - gold_mean(64)) < 0.5 and abs(start) > 1.5


def test_classification_and_trained_heads_are_left_alone(tmp_path):
    mrpc = prepare(SMOKE)
    assert mrpc.student.fresh_head is not None and not mrpc.task.is_regression
    assert torch.count_nonzero(head(mrpc).bias) == 0

    # A finished regression teacher (its head trained): a student cut from it keeps that head.
    trained = prepare(SMOKE, STSB)
    with torch.no_grad():
        trained.teacher.model.classifier.bias.fill_(1.25)
    trained.teacher.model.save_pretrained(tmp_path / "teacher")
    trained.teacher.tokenizer.save_pretrained(tmp_path / "teacher")
    recipe = tomllib.loads(Path(SMOKE).read_text())
    recipe["teacher"] = {"init": "pretrained", "model": str(tmp_path / "teacher")}  # finished: no train
    session = prepare(recipe, STSB)
    assert session.teacher.fresh_head is None and session.student.fresh_head is None
    assert head(session).bias.item() == 1.25
