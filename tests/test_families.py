"""Every encoder family as teacher and as student, on tiny random configs built in memory: the
captured attention scores are the model's own (their softmax is its attention probabilities, its
logits unchanged), EMD and one-to-one stages run, a student is cut from each family's teacher,
the export reloads without kdframe. And what a family cannot give is refused at validate."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import tomli_w
import torch

from conftest import ROOT, run_cli
from kdframe.api import TaskInfo
from kdframe.recipe import ModelSpec, TeacherSpec
from kdframe.session import feature_problems, prepare

GLUE = ROOT / "data" / "glue"
TASK = TaskInfo("pairs", 2, ("accuracy",), "accuracy", labels=("0", "1"))
SIZE = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 64}
#: model_type -> the config keys of a tiny model of the family (the tokenizer is builtin:chars).
FAMILIES = {
    "bert": {**SIZE, "intermediate_size": 64},
    "roberta": {**SIZE, "intermediate_size": 64, "max_position_embeddings": 66},
    "xlm-roberta": {**SIZE, "intermediate_size": 64, "max_position_embeddings": 66},
    "electra": {**SIZE, "intermediate_size": 64, "embedding_size": 16},
    "distilbert": {**SIZE, "hidden_dim": 64},
    "albert": {**SIZE, "intermediate_size": 64, "embedding_size": 16},
    "modernbert": {**SIZE, "intermediate_size": 64, "local_attention": 8},  # layers 1, 2: a sliding window
    "mpnet": {**SIZE, "intermediate_size": 64, "max_position_embeddings": 66},
    "deberta-v2": {**SIZE, "intermediate_size": 64, "pooler_hidden_size": 32},
    "camembert": {**SIZE, "intermediate_size": 64, "max_position_embeddings": 66},  # RoBERTa's code
}


def tiny(family: str):
    from kdframe_hf.models import load_model

    torch.manual_seed(0)
    spec = TeacherSpec(init="config", tokenizer="builtin:chars", config={"model_type": family, **FAMILIES[family]})
    return load_model("teacher", spec, TASK, None, ".", "")


def batch(loaded, rows=3, length=12):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, len(loaded.tokenizer), (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


#: The query (and key) projections' weights of every family, and in ModernBERT the fused one.
PROJECTIONS = re.compile(r"\.(query|q|q_lin|query_proj|key|k|k_lin|key_proj|Wqkv)\.weight$")


@pytest.mark.parametrize("scale", ["plain", "far-below-the-mask-threshold"])
@pytest.mark.parametrize("family", FAMILIES)
def test_captured_scores_are_the_models_own(family, scale):
    """softmax(captured scores) = the family's eager attention probabilities on every attended
    key (probability 0: a key the model masks, padding or outside a local window); the logits
    equal a forward without capture. Masked keys are zeroed by the mask, not by their score: with
    projections scaled up, real keys score far below the mask threshold and keep those scores."""
    from kdframe_hf.capture import MASKED, extract_features

    loaded = tiny(family)
    model = loaded.model.eval()
    assert loaded.features == frozenset({"logits", "hidden", "attn"})
    b = batch(loaded)
    with torch.no_grad():
        if scale != "plain":
            projections = [p for name, p in model.named_parameters() if PROJECTIONS.search(name)]
            assert projections, family
            for weight in projections:
                weight.mul_(150.0)
        plain = extract_features(model, b, frozenset()).logits
        got = extract_features(model, b, frozenset({"hidden", "attn"}))
        model.config._attn_implementation = "eager"
        inputs = {k: b[k] for k in ("input_ids", "attention_mask")}
        eager = model(**inputs, output_attentions=True)
    # Scaled scores: the capture's eager attention and the model's sdpa round differently.
    torch.testing.assert_close(got.logits, plain, atol=1e-6 if scale == "plain" else 1e-5, rtol=0)
    assert len(got.attn) == len(eager.attentions) == 4 and len(got.hidden) == 5
    for layer, (scores, probs) in enumerate(zip(got.attn, eager.attentions)):
        assert scores.shape == probs.shape == (3, 4, 12, 12), layer
        again = torch.softmax(scores.masked_fill(probs == 0, float("-inf")), -1)
        torch.testing.assert_close(again, probs, atol=1e-6, rtol=0, msg=f"{family} layer {layer}")
        assert (scores.masked_select(b["attention_mask"][:, None, None, :] == 0) == 0).all()  # masked keys zeroed
    if scale != "plain":  # the case this parametrisation is about
        assert any((scores.masked_select(probs > 0) <= MASKED).any() for scores, probs in zip(got.attn, eager.attentions))


@pytest.mark.parametrize("family", FAMILIES)
def test_student_cut_from_the_teacher_keeps_its_layers(family):
    from kdframe_hf.models import load_model

    teacher = tiny(family)
    student = load_model("student", ModelSpec(init="teacher-layers", layers=[1, 3]), TASK, teacher, ".", "")
    assert student.num_layers == 2 and student.model.config.model_type == teacher.model.config.model_type
    b = batch(student)
    with torch.no_grad():
        out = student.model.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                   output_hidden_states=True)
    assert len(out.hidden_states) == 3
    if family != "albert":  # its layers share weights: nothing to pick
        kept = {n: p for n, p in student.model.named_parameters() if ".0." in n or ".1." in n}
        source = dict(teacher.model.named_parameters())
        for name, param in kept.items():
            twin = name.replace(".0.", ".1.", 1) if ".0." in name else name.replace(".1.", ".3.", 1)
            if twin in source:
                assert torch.equal(param, source[twin]), name
    built = load_model("student", ModelSpec(init="config", config={"num_hidden_layers": 2}), TASK, teacher, ".", "")
    assert built.model.config.model_type == teacher.model.config.model_type and built.num_layers == 2


def recipe(tmp_path, family, mapping, **extra):
    raw = {
        "name": f"family_{family}", "seed": 1,
        "data": {"task": "mrpc", "glue_dir": str(GLUE), "max_length": 24, "train_limit": 32, "dev_limit": 16},
        "teacher": {"init": "config", "tokenizer": "builtin:chars", "config": {"model_type": family, **FAMILIES[family]},
                    "train": {"name": "teacher", "max_steps": 2, "lr": 1e-3, "batch_size": 16, "eval_every": 0}},
        "student": {"init": "teacher-layers", "layers": [1, 3]},
        "stages": [{"name": "distil", "max_steps": 2, "lr": 1e-3, "batch_size": 16, "eval_every": 2,
                    "mapping": {"strategy": mapping}, **extra,
                    "losses": {"att": 0.01, "hid": 0.01, "emb": 0.01, "pred": 1.0}}],
    }
    path = tmp_path / f"{family}-{mapping}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_emd_and_one_to_one_run_and_the_export_reloads(family, tmp_path, cli):
    for mapping, extra in (("emd", {"weighting": {"strategy": "cost-attention"}}), ("one-to-one", {})):
        out = tmp_path / mapping
        result = cli("run", str(recipe(tmp_path, family, mapping, **extra)), "--out", str(out), "--progress", "off")
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["stage"] == "distil" and "loss" in r]
        assert train and all(torch.isfinite(torch.tensor([r[k] for k in ("att", "hid", "emb", "pred")])).all()
                             for r in train)
    exported = tmp_path / "exported"
    assert cli("export", str(tmp_path / "one-to-one"), str(exported)).returncode == 0
    code = ("import sys, transformers\n"
            f"m = transformers.AutoModelForSequenceClassification.from_pretrained({str(exported)!r})\n"
            "assert not any(k.startswith('kdframe') for k in sys.modules)\n"
            "print(m.config.model_type, m.config.num_hidden_layers)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [family, "2"]


def test_a_family_without_attention_capture_runs_what_needs_none(tmp_path, monkeypatch):
    """Gate on needs, not on type: with no capture route, a recipe that reads hidden states and
    logits runs, and one that reads attention is refused at validate, naming the term, the model
    and the terms that would work."""
    env = {"KDFRAME_TEST_NO_CAPTURE": "mpnet"}
    hidden_only = recipe(tmp_path, "mpnet", "emd")
    text = hidden_only.read_text().replace("att = 0.01\n", "")
    hidden_only.write_text(text)
    ok = run_cli("run", str(hidden_only), "--out", str(tmp_path / "ok"), "--progress", "off",
                 "-p", "kdframe_test_no_capture", env=env)
    assert ok.returncode == 0, ok.stderr
    refused = run_cli("validate", str(recipe(tmp_path, "mpnet", "emd")), "-p", "kdframe_test_no_capture", env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "stages[0].losses.att: 'att' reads attention scores, which the teacher does not give" in refused.stderr
    assert "mpnet, 4 layers" in refused.stderr and "terms that work with these models: " in refused.stderr
    assert "hid" in refused.stderr.split("terms that work with these models: ")[1]


def test_cls_vectors_are_read_from_the_hidden_states_a_loader_gives():
    """PKD's pt reads [CLS] vectors: a loader that declares hidden states (not ``cls``, which a
    third-party loader written before it need not know) serves it; one without hidden states is
    refused naming the term."""
    session = prepare(ROOT / "recipes" / "smoke" / "pkd.toml", [], load_data=False)
    for loaded in (session.teacher, session.student):
        loaded.features = frozenset({"logits", "hidden"})
    assert feature_problems(session) == []
    session.teacher.features = frozenset({"logits"})
    problems = feature_problems(session)
    assert problems and all(p.startswith("stages[0].") for p in problems)
    assert any(p.startswith("stages[0].losses.pt: 'pt' reads [CLS] vectors, which the teacher does not give")
               for p in problems)


def test_a_capture_adapter_needs_the_mask_its_modules_are_given():
    """softmax_capture zeroes masked keys by the module's mask argument: an adapter naming one the
    modules do not take is refused before any forward, naming the class and the argument."""
    from kdframe.api import ModelError
    from kdframe_hf.capture import softmax_capture

    model = tiny("bert").model
    with pytest.raises(ModelError, match=r"BertSelfAttention.forward has no 'mask' argument"):
        with softmax_capture("BertSelfAttention", mask_argument="mask")(model):
            pass


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fresh_head_is_the_layer_that_gives_the_logits(family):
    """``fresh_head`` (whose bias ``student.head_bias`` sets) is found by structure: moving its bias
    moves every logit by the same amount, in each family's head."""
    loaded = tiny(family)
    model = loaded.model.eval()
    assert loaded.fresh_head is not None and loaded.fresh_head.out_features == TASK.num_labels
    inputs = {k: v for k, v in batch(loaded).items() if k != "token_type_ids"}
    with torch.no_grad():
        before = model(**inputs).logits
        loaded.fresh_head.bias += 2.5
        after = model(**inputs).logits
    torch.testing.assert_close(after - before, torch.full_like(before, 2.5), atol=1e-5, rtol=0)
