"""Bad recipes: every one exits 2 before training, naming the file or the field path."""

import sys

import pytest
import torch
from robust_helpers import SMOKE, assert_bad_input, kd, smoke_raw, write_recipe

# -- the file itself ----------------------------------------------------------------------------


def test_empty_recipe_file(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert_bad_input(kd("validate", path), str(path), "the recipe is empty")


def test_recipe_that_is_not_toml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[data\ntask = "mrpc"\n')
    assert_bad_input(kd("validate", path), str(path), "not valid TOML", "line 2")


def test_recipe_in_latin1_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    assert_bad_input(kd("validate", path), str(path), "not UTF-8")


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "no-such-recipe.toml"
    assert_bad_input(kd("validate", path), "recipe file not found", str(path))


def test_recipe_that_extends_itself(tmp_path):
    path = tmp_path / "loop.toml"
    path.write_text('extends = "loop.toml"\nname = "x"\n')
    assert_bad_input(kd("validate", path), "extends", "extends itself")


# -- wrong types ---------------------------------------------------------------------------------

@pytest.mark.parametrize("assignment, where", [
    ('stages[0].lr="fast"', "stages[0].lr: expected float"),
    ('data.max_length="long"', "data.max_length: expected int"),
    ("seed=1.5", "seed: expected int"),  # was silently truncated to 1
    ("stages[0].epochs=true", "stages[0].epochs: expected int"),  # was silently 1
    ('stages[0].losses.pred.t2="false"', "stages[0].losses.pred.t2: expected bool"),  # was silently True
    ("name=5", "name: expected str"),
    ("teacher.config=3", "teacher.config: expected dict"),
    ('student.layers=[1, "x"]', "student.layers[1]: expected int"),
    ('stages[0].losses.pred="x"', "stages[0].losses['pred']: expected a weight"),
], ids=["lr-string", "max_length-string", "seed-float", "epochs-bool", "t2-string", "name-int",
        "config-not-table", "layers-item", "loss-string"])
def test_wrong_type(assignment, where):
    assert_bad_input(kd("validate", SMOKE, "--set", assignment), where, str(SMOKE))


# -- unknown keys at every nesting level ---------------------------------------------------------

@pytest.mark.parametrize("path, allowed", [
    ("bogus", "allowed: data, teacher, student, stages"),
    ("data.bogus", "allowed: task, source, max_length, train_limit, dev_limit, cache_dir, glue_dir"),
    ("teacher.bogus", "allowed: init, model, tokenizer"),
    ("teacher.train.bogus", "allowed: name, epochs"),
    ("student.bogus", "allowed: init, model, tokenizer"),
    ("stages[0].bogus", "allowed: name, epochs"),
    ("stages[0].mapping.bogus", "allowed: none (it takes no parameters)"),
    ("stages[0].weighting.bogus", "allowed: normalize, temperature, separate, eps"),
    ("stages[0].losses.pred.bogus", "allowed: temperature, t2"),
], ids=["top", "data", "teacher", "teacher.train", "student", "stages[0]", "mapping-params", "weighting-params",
        "pred-params"])
def test_unknown_key(path, allowed):
    parent = path.rpartition(".")[0] or "(top level)"
    result = kd("validate", SMOKE, "--set", f"{path}=1")
    assert_bad_input(result, f"{parent}: unknown key 'bogus'", allowed)
    # one cause, one line: an invalid mapping is not also reported as a missing one
    assert "needs a mapping" not in result.err


# -- out-of-range values -------------------------------------------------------------------------

@pytest.mark.parametrize("assignment, message", [
    ("stages[0].lr=-1e-3", "stages[0].lr: must be > 0, got -0.001"),
    ("stages[0].batch_size=0", "stages[0].batch_size: must be > 0, got 0"),
    ("stages[0].losses.pred.temperature=0", "stages[0].losses.pred.temperature: must be > 0, got 0.0"),
    ("teacher.train.lr=0", "teacher.train.lr: must be > 0, got 0.0"),
    ("stages[0].warmup_ratio=1.5", "stages[0].warmup_ratio: must be < 1, got 1.5"),
    ("stages[0].weighting.eps=0", "stages[0].weighting.eps: must be > 0"),
    ('stages[0].nonfinite="ignore"', "stages[0].nonfinite: must be one of 'stop', 'skip'"),
], ids=["negative-lr", "zero-batch", "temperature-0", "teacher-lr-0", "warmup-1.5", "eps-0", "nonfinite-literal"])
def test_out_of_range(assignment, message):
    assert_bad_input(kd("validate", SMOKE, "--set", assignment), message)


# -- conflicting options -------------------------------------------------------------------------

def test_weighting_without_mapping(tmp_path):
    raw = smoke_raw()
    del raw["stages"][0]["mapping"]
    raw["stages"][0]["losses"] = {"pred": 1.0}
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)),
                     "stages[0].weighting: a weighting needs a mapping")


def test_layer_losses_without_mapping(tmp_path):
    raw = smoke_raw()
    del raw["stages"][0]["mapping"]
    del raw["stages"][0]["weighting"]
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)),
                     "stages[0].mapping: loss terms att, hid need a layer mapping")


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid where CUDA is")
def test_fp16_on_cpu():
    assert_bad_input(kd("validate", SMOKE, "--set", 'precision="fp16"'), "precision: 'fp16' needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is valid where CUDA is")
def test_cuda_device_without_cuda():
    assert_bad_input(kd("validate", SMOKE, "--set", 'device="cuda"'), "device: 'cuda'")


def test_stage_named_teacher():
    assert_bad_input(kd("validate", SMOKE, "--set", 'stages[0].name="teacher"'),
                     "stages[0].name: 'teacher' is reserved")


def test_two_stages_with_one_name(tmp_path):
    raw = smoke_raw()
    raw["stages"].append(dict(raw["stages"][0]))
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)), "stages[1].name: 'distil' is used twice")


def test_teacher_trained_on_soft_targets(tmp_path):
    raw = smoke_raw()
    raw["teacher"]["train"]["losses"] = {"pred": 1.0}
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)), "teacher.train.losses: the teacher is trained on labels only")


def test_all_loss_weights_zero():
    assert_bad_input(kd("validate", SMOKE, "--set", "stages[0].losses={pred = 0.0}"),
                     "stages[0].losses: no loss term has a non-zero weight")


def test_unknown_loss_term():
    assert_bad_input(kd("validate", SMOKE, "--set", "stages[0].losses.nope=1.0"),
                     "stages[0].losses.nope: unknown loss strategy 'nope'; known: att")


# -- missing sections ----------------------------------------------------------------------------

@pytest.mark.parametrize("section", ["data", "teacher", "student", "stages"])
def test_missing_required_section(tmp_path, section):
    raw = smoke_raw()
    del raw[section]
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)), f"{section}: required key '{section}' is missing")


def test_empty_stage_list(tmp_path):
    raw = smoke_raw()
    raw["stages"] = []
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)), "stages: at least one [[stages]] table is required")


# -- --set to a path that does not exist ---------------------------------------------------------

@pytest.mark.parametrize("assignment, message", [
    ("stages[3].lr=1e-4", "--set stages[3].lr: stages has 1 entries, no [3]"),
    ("seed.value=1", "--set seed.value: seed is not a table"),
    ("stages[0].losses.hid.tokens=\"real\"", "--set stages[0].losses.hid.tokens: stages[0].losses.hid is not a table"),
    ("name[0]=1", "--set name[0]: name has 0 entries, no [0]"),
    ("stages[0].lr", "expected PATH=VALUE"),
    ("stages..lr=1", "bad path"),
], ids=["index-out-of-range", "through-scalar", "through-loss-weight", "index-into-string", "no-value", "empty-segment"])
def test_set_to_a_path_that_does_not_exist(assignment, message):
    assert_bad_input(kd("validate", SMOKE, "--set", assignment), message)


# -- the same checks through `run --out`: nothing is written -----------------------------------

@pytest.mark.parametrize("args", [
    ["--set", "stages[0].lr=-1"],
    ["--set", "stages[0].bogus=1"],
    ["--set", 'data.task="nope"'],
    ["-p", "kdframe_test_broken_import"],
], ids=["range", "unknown-key", "unknown-task", "broken-plugin"])
def test_bad_input_to_run_leaves_no_run_directory(tmp_path, args):
    out = tmp_path / "run"
    assert_bad_input(kd("run", SMOKE, "--out", out, "--progress", "off", *args), out=out)
    assert not out.exists()


def test_the_console_script_exits_2_without_traceback(tmp_path):
    """One case through a real process and the installed ``kdframe`` script, not main()."""
    import subprocess
    from pathlib import Path

    script = Path(sys.executable).with_name("kdframe")
    path = tmp_path / "broken.toml"
    path.write_text("[data\n")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kdframe.cli"]
    done = subprocess.run([*command, "validate", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "not valid TOML" in done.stderr and str(path) in done.stderr


# -- numbers the schema used to let through (every one refused before a run directory exists) -----

@pytest.mark.parametrize("assignment, message", [
    ("stages[0].lr=inf", "stages[0].lr: must be a finite number, got inf"),
    ("stages[0].lr=nan", "stages[0].lr: must be a finite number, got nan"),
    ("stages[0].warmup_ratio=-inf", "stages[0].warmup_ratio: must be a finite number, got -inf"),
    ("stages[0].losses.hid=nan", "stages[0].losses['hid']: a weight must be a finite number >= 0"),
    ("stages[0].losses.hid=-0.5", "a weight must be a finite number >= 0 (0 turns the term off), got -0.5"),
    ("stages[0].losses.pred.weight=-1.0", "'weight' must be a finite number >= 0 (0 turns the term off), got -1.0"),
    ("stages[0].losses.pred.temperature=inf", "stages[0].losses.pred.temperature: must be a finite number"),
    ("stages[0].epochs=0", "stages[0]: epochs = 0 and max_steps = 0 train nothing"),
    ("teacher.train.epochs=0", "teacher.train: epochs = 0 and max_steps = 0 train nothing"),
    ("seed=18446744073709551617", "seed: must be <= 4294967295"),
    ("seed=-1", "seed: must be >= 0"),
    ("teacher.seed=4294967296", "teacher.seed: must be <= 4294967295"),
    ("data.max_length=80", "data.max_length: 80 tokens is longer than the teacher takes (64:"),
], ids=["lr-inf", "lr-nan", "warmup-minus-inf", "weight-nan", "weight-negative", "weight-table-negative",
        "temperature-inf", "epochs-0", "teacher-epochs-0", "seed-beyond-64-bits", "seed-negative",
        "teacher-seed-33-bits", "max-length-beyond-positions"])
def test_numbers_out_of_their_range(tmp_path, assignment, message):
    out = tmp_path / "run"
    result = kd("run", SMOKE, "--out", out, "--progress", "off", "--set", assignment)
    assert_bad_input(result, message)
    assert not out.exists()  # refused before the run directory exists
    problems = result.err.strip().splitlines()[1:]  # after the line naming the recipe
    assert len(problems) == (2 if "max_length" in assignment else 1), problems  # max_length: both models


def test_epochs_0_with_max_steps_is_fine():
    assert kd("validate", SMOKE, "--set", "stages[0].epochs=0", "--set", "stages[0].max_steps=3").rc == 0


# -- names that would become paths ----------------------------------------------------------------

@pytest.mark.parametrize("assignment, where", [
    ('name="../x"', "name"), ('name="/abs/x"', "name"), ('name="a b"', "name"),
    ('stages[0].name="../../escape"', "stages[0].name"), ('name=""', "name"),
])
def test_names_are_plain(tmp_path, monkeypatch, assignment, where):
    monkeypatch.chdir(tmp_path)
    result = kd("run", SMOKE, "--progress", "off", "--set", assignment)
    assert_bad_input(result, f"{where}: must be a plain name (letters, digits, '_', '-', '.'; it names files)")
    assert not any(tmp_path.rglob("*")) and not (tmp_path.parent / "x").exists()


# -- every problem at once, across both passes ---------------------------------------------------

def test_a_schema_error_and_strategy_param_errors_are_reported_together(tmp_path):
    raw = smoke_raw()
    raw["teacher"]["zz"] = 1  # the schema pass fails on this
    raw["stages"][0]["mapping"] = {"strategy": "emd", "reg": 1}  # strategy params: the second pass
    raw["stages"][0]["weighting"] = {"strategy": "cost-attention", "normalize": "max"}
    raw["data"]["bogus"] = 1  # the data source's keys: the second pass too
    result = kd("validate", write_recipe(tmp_path, raw))
    assert_bad_input(result, "teacher: unknown key 'zz'", "stages[0].mapping: unknown key 'reg'",
                     "stages[0].weighting.normalize: must be one of 'sum', 'softmax'", "data: unknown key 'bogus'")
