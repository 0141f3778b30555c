"""Models that cannot be loaded or compared: exit 2 from `kdframe validate`, naming the cause.

Models are tiny (hidden 32) random ones built from smoke_tiny's config; `validate` loads them and
dry-runs one step, which is where layer counts and head counts are checked.
"""

import pytest
from robust_helpers import SMOKE, assert_bad_input, kd, smoke_raw, write_recipe


def recipe(tmp_path, **changes):
    raw = smoke_raw()
    for section, value in changes.items():
        raw[section] = value
    return write_recipe(tmp_path, raw)


@pytest.mark.parametrize("model", ["absolute", "./relative-missing"])
def test_model_path_that_does_not_exist(tmp_path, model):
    path = tmp_path / "no-such-model" if model == "absolute" else model
    raw = smoke_raw()
    raw["teacher"].update(init="pretrained", model=str(path))
    missing = tmp_path / ("no-such-model" if model == "absolute" else "relative-missing")
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)), f"model directory {missing} does not exist")


def test_model_package_that_is_not_installed(tmp_path):
    raw = smoke_raw()
    raw["teacher"].update(init="pretrained", model="package:no_such_model_pkg")
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)), "package:no_such_model_pkg: cannot import")


def test_model_that_cannot_run_on_a_padded_batch(tmp_path):
    """Any family loads (kdframe gates on what a recipe reads, not on the model type); one whose
    forward fails on the recipe's batches (GPT-2 without a padding token) is bad input, caught by
    the dry run before training."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=128, n_positions=64)).save_pretrained(folder)
    raw = smoke_raw()
    raw["teacher"] = {"init": "pretrained", "model": str(folder), "tokenizer": "builtin:chars",
                      "train": raw["teacher"]["train"]}
    raw["student"] = {"init": "teacher-layers", "layers": [0]}
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)),
                     "a gpt2 model's forward failed", "Cannot handle batch sizes > 1 if no padding token is defined")


def deeper_student(tmp_path, mapping):
    raw = smoke_raw()
    raw["teacher"]["config"]["num_hidden_layers"] = 2
    raw["student"] = {"init": "config", "config": {"num_hidden_layers": 4}}
    raw["stages"][0]["mapping"] = {"strategy": mapping}
    del raw["stages"][0]["weighting"]
    return write_recipe(tmp_path, raw)


def test_student_deeper_than_teacher_for_one_to_one(tmp_path):
    assert_bad_input(kd("validate", deeper_student(tmp_path, "one-to-one")), "mapping one-to-one", "N=2, M=4")


def test_student_deeper_than_teacher_for_pkd(tmp_path):
    assert_bad_input(kd("validate", deeper_student(tmp_path, "pkd")),
                     "mapping pkd: the student must not be deeper than the teacher (N=2, M=4)")


def test_attention_head_counts_differ_without_average_heads(tmp_path):
    raw = smoke_raw()
    raw["student"] = {"init": "config", "config": {"num_hidden_layers": 2, "num_attention_heads": 2}}
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)),
                     "loss att: the student has 2 attention heads and the teacher 4", "average_heads = true")
    # `run` finds it before the teacher is fine-tuned, and writes nothing
    out = tmp_path / "run"
    assert_bad_input(kd("run", write_recipe(tmp_path, raw), "--out", out, "--progress", "off"),
                     "loss att: the student has 2 attention heads", out=out)
    assert not out.exists()
    # the remedy the message names works
    raw["stages"][0]["losses"]["att"] = {"weight": 0.01, "average_heads": True}
    ok = kd("validate", write_recipe(tmp_path, raw, "fixed.toml"))
    assert ok.rc == 0, ok.err


def test_hidden_size_not_divisible_by_heads(tmp_path):
    raw = smoke_raw()
    raw["student"] = {"init": "config", "config": {"num_hidden_layers": 2, "hidden_size": 30}}
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)),
                     "student.config: cannot build a bert model", "hidden size (30)", "attention heads (4)")


def test_unknown_model_config_key(tmp_path):
    raw = smoke_raw()
    raw["student"] = {"init": "config", "config": {"num_hidden_layers": 2, "hidden_sizee": 16}}
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)),
                     "student.config: unknown key(s) hidden_sizee", "valid keys:")


def test_student_layers_outside_the_teacher(tmp_path):
    raw = smoke_raw()
    raw["student"]["layers"] = [1, 5]
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)),
                     "student.layers: [5] out of range; the teacher has 4 layers")


def test_teacher_layers_init_for_the_teacher(tmp_path):
    raw = smoke_raw()
    raw["teacher"]["init"] = "teacher-layers"
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)), "teacher: init = 'teacher-layers' needs a teacher")


def test_different_vocabularies(tmp_path):
    from transformers import BertTokenizer

    from kdframe_hf.tokenizer import chars_tokenizer

    vocab = chars_tokenizer().get_vocab()
    fewer = sorted(vocab, key=vocab.get)[:-10]
    BertTokenizer(vocab={token: i for i, token in enumerate(fewer)}).save_pretrained(tmp_path / "tok")
    raw = smoke_raw()
    raw["student"] = {"init": "config", "tokenizer": str(tmp_path / "tok"), "config": {"num_hidden_layers": 2}}
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)),
                     "student and teacher vocabularies differ", "student: 92 tokens", "teacher: 102 tokens")


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no network"])
def test_hub_model_out_of_reach_fails_in_one_line(offline, monkeypatch):
    """Offline (the flag, or no connection to the hub): the local hub cache only, so one line at
    once naming what was looked up, instead of half a minute of retries."""
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        reason = "HF_HUB_OFFLINE is set"
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr("kdframe.network._probe", lambda host, port, timeout: f"{host} is out of reach (test)")
        reason = "huggingface.co is out of reach (test)"
    result = kd("validate", SMOKE, "--set", 'teacher.init="pretrained"', "--set", 'teacher.model="someorg/not-cached"')
    assert_bad_input(result, f"cannot load model 'someorg/not-cached': the Hugging Face hub cannot be reached ({reason})"
                             " and it is not in the local hub cache")
    assert len(result.err.strip().splitlines()) == 1 and "Retrying" not in result.err
