"""kdframe export writes a model card (README.md in the hub's format) from the run's own numbers;
--push-to-hub refuses a bad repository id before exporting and, offline, fails in seconds with
one line and the export kept."""

from __future__ import annotations

import json
import time

import pytest
from huggingface_hub import ModelCard

from conftest import ROOT, run_cli

SMOKE = ROOT / "recipes" / "smoke_tiny.toml"

TEACHER_CARD = "---\nlicense: mit\nbase_model: acme/tiny-bert\n---\n# A tiny BERT\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A short run whose teacher is a pretrained directory with a model card, and its export."""
    from transformers import BertConfig, BertForSequenceClassification

    base = tmp_path_factory.mktemp("card")
    teacher = base / "teacher"
    config = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(teacher)
    (teacher / "README.md").write_text(TEACHER_CARD)
    run = base / "run"
    result = run_cli("run", str(SMOKE), "--out", str(run), "--progress", "off", "--set", "stages[0].max_steps=4",
                     "--set", 'teacher.init="pretrained"', "--set", f'teacher.model="{teacher}"',
                     "--set", "teacher.config={}")
    assert result.returncode == 0, result.stderr
    out = base / "exported"
    result = run_cli("export", str(run), str(out))
    assert result.returncode == 0, result.stderr
    return run, out


def test_the_card_holds_the_runs_numbers(exported):
    run, out = exported
    summary = json.loads((run / "summary.json").read_text())
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["base_model"] == "acme/tiny-bert"  # from the teacher's own card
    assert data["library_name"] == "transformers" and "emd" in data["tags"]
    [result] = data["model-index"][0]["results"]
    assert result["dataset"] == {"name": "mrpc", "type": "mrpc", "split": "dev"}
    scores = {m["type"]: m["value"] for m in result["metrics"]}
    assert scores == {k: round(v, 4) for k, v in summary["student"]["best"].items()}
    teacher_row = f"| teacher | {summary['teacher']['params']:,} | {summary['teacher']['dev']['accuracy']:.4f} |"
    student_row = f"| student | {summary['student']['params']:,} | {summary['student']['best']['accuracy']:.4f} |"
    assert teacher_row in card.text and student_row in card.text
    assert (run / "recipe.resolved.toml").read_text().rstrip() in card.text
    assert "a speed-up of" in card.text and "4 steps in" in card.text


def test_the_card_is_beside_the_weights_a_pipeline_loads(exported):
    _, out = exported
    assert {"README.md", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}


def test_a_bad_repository_id_is_refused_before_exporting(exported, tmp_path, cli):
    run, _ = exported
    result = cli("export", str(run), str(tmp_path / "out"), "--push-to-hub", "no-owner")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--push-to-hub: 'no-owner' is not a model repository id (OWNER/NAME)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_push_offline_fails_in_seconds_and_keeps_the_export(exported, tmp_path, cli):
    run, _ = exported
    out = tmp_path / "out"
    started = time.monotonic()
    result = cli("export", str(run), str(out), "--push-to-hub", "someone/student", env={"HF_HUB_OFFLINE": "1"})
    assert time.monotonic() - started < 60  # the export itself; the push gives up at once
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot push to the Hugging Face hub: it cannot be reached (HF_HUB_OFFLINE is set)" in result.stderr
    assert f"the export is in {out}" in result.stderr
    assert (out / "README.md").is_file() and (out / "config.json").is_file()
