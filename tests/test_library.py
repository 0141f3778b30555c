"""kdframe.run from Python: with in-memory models, tokenizer and datasets it trains exactly as the
CLI does on the same recipe reading the same things from files; the objects passed stay as they
were; what cannot work is refused before anything is written."""

from __future__ import annotations

import csv
import json
import tomllib

import pytest
import torch

import kdframe
from conftest import ROOT, run_cli
from kdframe import memory
from kdframe.errors import KdframeError, RecipeError

MRPC = ROOT / "data" / "glue" / "MRPC"

# The smoke recipe's shape on the text source: a pretrained tiny teacher directory, MRPC rows as CSV.
RECIPE = """
name = "api"
seed = 3

[data]
source = "text"
task = "mrpc-csv"
train_file = "train.csv"
dev_file = "dev.csv"
text_columns = ["sentence1", "sentence2"]
labels = ["0", "1"]
metrics = ["f1", "accuracy"]
max_length = 48

[teacher]
init = "pretrained"
model = "teacher"

[teacher.train]
epochs = 1
lr = 1e-3
batch_size = 16
eval_every = 0

[student]
init = "teacher-layers"
layers = [1, 3]

[[stages]]
name = "distil"
epochs = 2
lr = 1e-3
batch_size = 16
eval_every = 4
log_every = 1
mapping = { strategy = "emd" }
weighting = { strategy = "cost-attention" }

[stages.losses]
att = 1.0
hid = 1.0
pred = 1.0
"""


def mrpc_rows(split, limit):
    with (MRPC / f"{split}.tsv").open(encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:limit + 1]
    return [{"sentence1": r[3], "sentence2": r[4], "label": int(r[0])} for r in rows]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    from kdframe_hf.tokenizer import chars_tokenizer

    root = tmp_path_factory.mktemp("library")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, vocab_size=len(chars_tokenizer()))
    BertForSequenceClassification(config).save_pretrained(root / "teacher")
    chars_tokenizer().save_pretrained(root / "teacher")
    for split, limit in (("train", 64), ("dev", 32)):
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, ["sentence1", "sentence2", "label"])
            writer.writeheader()
            writer.writerows(mrpc_rows(split, limit))
    (root / "recipe.toml").write_text(RECIPE)
    return root


def objects(root):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return {"teacher": AutoModelForSequenceClassification.from_pretrained(root / "teacher"),
            "tokenizer": AutoTokenizer.from_pretrained(root / "teacher"),
            "train": Dataset.from_list(mrpc_rows("train", 64)), "dev": Dataset.from_list(mrpc_rows("dev", 32))}


def losses(run_dir):
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.fixture(scope="module")
def cli_run(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli("run", str(workdir / "recipe.toml"), "--out", str(out), "--progress", "off")
    assert result.returncode == 0, result.stderr
    return out


def test_in_memory_objects_train_as_the_cli_does_on_files(workdir, cli_run, tmp_path):
    given = objects(workdir)
    before = {k: v.clone() for k, v in given["teacher"].state_dict().items()}
    result = kdframe.run(workdir / "recipe.toml", **given, out=tmp_path / "run", progress="off")
    expected = losses(cli_run)
    assert len(expected) == 9 and losses(result.run_dir) == expected  # same seed, same losses, bit for bit
    assert result.summary["student"] == json.loads((cli_run / "summary.json").read_text())["student"] | {
        "description": result.summary["student"]["description"]}
    resolved = tomllib.loads((result.run_dir / "recipe.resolved.toml").read_text())
    assert resolved["teacher"]["model"].startswith("memory:model-")
    assert resolved["data"]["dataset"].startswith("memory:datasets-") and not resolved["data"]["train_file"]
    # The caller's teacher is not trained in place; the student given back is the trained one.
    assert all(torch.equal(before[k], v) for k, v in given["teacher"].state_dict().items())
    assert type(result.student).__name__ == "BertForSequenceClassification"
    assert result.student.config.num_hidden_layers == 2 and not result.student.training
    saved = torch.load(result.run_dir / "student.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in result.student.state_dict().items())


def test_a_recipe_as_a_dict_runs_like_its_file(workdir, cli_run, tmp_path, monkeypatch):
    monkeypatch.chdir(workdir)  # a dict's relative paths are relative to the working directory
    result = kdframe.run(tomllib.loads(RECIPE), out=tmp_path / "run", progress="off")
    distil = [record for record in losses(cli_run) if record[0] == "distil"]  # its teacher came from the cache
    assert len(distil) == 8 and losses(result.run_dir) == distil


def test_same_objects_same_names_other_content_other_names(workdir):
    first, second = objects(workdir), objects(workdir)
    for kind, key in (("model", "teacher"), ("tokenizer", "tokenizer")):
        assert memory.put(kind, first[key]) == memory.put(kind, second[key])
    assert memory.put("datasets", {"train": first["train"]}) == memory.put("datasets", {"train": second["train"]})
    with torch.no_grad():
        second["teacher"].classifier.bias.add_(1e-3)
    assert memory.put("model", first["teacher"]) != memory.put("model", second["teacher"])
    assert memory.put("datasets", {"train": first["train"]}) != memory.put("datasets", {"train": first["dev"]})


def test_datasets_need_a_source_that_reads_them(workdir, tmp_path):
    given = objects(workdir)
    with pytest.raises(RecipeError, match="data.source: 'glue' cannot read datasets passed to kdframe.run;"
                                          " sources that can: text"):
        kdframe.run(ROOT / "recipes" / "smoke_tiny.toml", train=given["train"], dev=given["dev"], out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_model_without_a_classification_head_is_refused(workdir, tmp_path):
    from transformers import AutoModel

    with pytest.raises(KdframeError, match="teacher: kdframe.run takes a transformers sequence-classification model"
                                           r" \(AutoModelForSequenceClassification\), not a BertModel"):
        kdframe.run(workdir / "recipe.toml", teacher=AutoModel.from_pretrained(workdir / "teacher"),
                    out=tmp_path / "run", progress="off")
    assert not (tmp_path / "run").exists()


def test_a_memory_name_outside_its_process_is_one_clear_error(workdir, tmp_path, cli):
    result = cli("validate", str(workdir / "recipe.toml"), "--set", 'teacher.model="memory:model-0123"')
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "memory:model-0123: an object handed to kdframe.run in the Python process that started the run" in result.stderr


def test_the_python_example_runs(tmp_path):
    """examples/python_api/distil_in_python.py --quick: the MiniLM teacher, the movie-review data."""
    import subprocess
    import sys

    script = ROOT / "examples" / "python_api" / "distil_in_python.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "student dev scores: {'accuracy':" in result.stdout
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 3 and student.config.id2label == {0: "negative", 1: "positive"}
