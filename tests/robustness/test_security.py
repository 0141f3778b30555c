"""Security: a recipe cannot make kdframe import a module; no remote code; checkpoints hold data only.

The only module imports driven by user input are ``-p MODULE`` (the command line, not the recipe)
and ``package:NAME`` model sources, which import only the top-level package of an installed
distribution.
"""

import ast
import sys
import typing

import attrs
import pytest
import torch
from robust_helpers import SMOKE, assert_bad_input, kd, smoke_raw, write_recipe

from conftest import ROOT
from conftest import bundled_host, read_recipe
from kdframe.recipe import Recipe, to_plain
from kdframe.rundir import RECIPE, recipe_toml

CANARY = "kdframe_robust_canary"  # tests/fixtures: importing it writes KDFRAME_ROBUST_CANARY
SOURCES = sorted([*(ROOT / "kdframe").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])


@pytest.fixture
def canary(tmp_path, monkeypatch):
    path = tmp_path / "canary.txt"
    monkeypatch.setenv("KDFRAME_ROBUST_CANARY", str(path))
    sys.modules.pop(CANARY, None)
    yield path
    assert CANARY not in sys.modules, "a recipe made kdframe import a module"
    assert not path.exists(), "a recipe made kdframe import a module"


@pytest.mark.parametrize("value", [CANARY, f"{CANARY}:get_model_path", "os.system"])
def test_a_module_path_as_a_strategy_is_an_unknown_strategy(canary, value):
    result = kd("validate", SMOKE, "--set", f'stages[0].mapping.strategy="{value}"')
    assert_bad_input(result, f"stages[0].mapping: unknown mapping strategy '{value}'; known: emd")


def test_package_source_imports_only_installed_distributions(canary, tmp_path):
    raw = smoke_raw()
    raw["teacher"].update(init="pretrained", model=f"package:{CANARY}")
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)),
                     f"package:{CANARY}: cannot import the model package", "no installed distribution")


def string_fields(cls, prefix=""):
    """Every str-typed field path of the recipe schema, following nested attrs classes (also
    optional ones and lists of them), so that a key added later is covered too."""
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        path, kind = f"{prefix}{field.name}", hints[field.name]
        if kind is str:
            yield path
        elif attrs.has(kind):
            yield from string_fields(kind, path + ".")
        elif typing.get_origin(kind) is list and attrs.has(typing.get_args(kind)[0]):
            yield from string_fields(typing.get_args(kind)[0], path + "[0].")
        else:
            for arg in typing.get_args(kind):  # X | None
                if attrs.has(arg):
                    yield from string_fields(arg, path + ".")


def test_no_recipe_key_imports_a_module(canary, tmp_path):
    """Every string a recipe holds (and every strategy name) set to a module name: never imported."""
    sources = bundled_host().registry.data_sources()  # their keys sit in [data]
    paths = sorted(set(string_fields(Recipe)) | {f"data.{path}" for s in sources for path in string_fields(s.params)})
    assert {"name", "data.task", "data.source", "data.glue_dir", "teacher.model", "teacher.tokenizer", "teacher.train.name",
            "student.model", "student.tokenizer", "stages[0].name"} <= set(paths)
    assignments = [[f'{path}="{value}"'] + ([f'{path.split(".")[0]}.init="pretrained"'] if path.endswith(".model") else [])
                   for path in paths for value in (CANARY, f"package:{CANARY}")]
    assignments.append([f"stages[0].losses.{CANARY}=1.0"])  # a loss term named like a module
    recipe = write_recipe(tmp_path, smoke_raw())
    for sets in assignments:
        result = kd("validate", recipe, *(arg for value in sets for arg in ("--set", value)))
        assert "Traceback" not in result.err, (sets, result.err)
        assert result.rc in (0, 2), (sets, result.err)
        assert CANARY not in sys.modules and not canary.exists(), f"{sets} imported the module"


def test_checkpoint_holding_code_is_refused_not_run(tmp_path):
    """Checkpoints load with weights_only=True: a pickled call is an error, and is never made."""
    touched = tmp_path / "touched"

    class Payload:
        def __reduce__(self):
            return (open, (str(touched), "w"))

    run = tmp_path / "run"
    run.mkdir()
    (run / RECIPE).write_text(recipe_toml(to_plain(read_recipe(SMOKE).recipe)))
    torch.save({"stage": "distil", "model": Payload()}, run / "checkpoint.pt")
    assert_bad_input(kd("run", SMOKE, "--resume", run, "--progress", "off"),
                     f"checkpoint {run / 'checkpoint.pt'} cannot be loaded")
    assert not touched.exists()


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def dotted(func):
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    parts.append(func.id if isinstance(func, ast.Name) else "<expr>")  # x().eval() is not eval()
    return ".".join(reversed(parts))


def test_no_call_site_trusts_remote_code():
    assert SOURCES
    offenders = []
    for path in SOURCES:
        text = path.read_text()
        for call in calls(ast.parse(text)):
            for keyword in call.keywords:
                if keyword.arg == "trust_remote_code" and not (
                        isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
                if keyword.arg is None:  # **kwargs could smuggle it in: no literal dict may hold it
                    if isinstance(keyword.value, ast.Dict) and any(
                            isinstance(k, ast.Constant) and k.value == "trust_remote_code" for k in keyword.value.keys):
                        offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
        if "trust_remote_code=True" in text.replace(" ", ""):
            offenders.append(f"{path.relative_to(ROOT)} (text)")
    assert not offenders, offenders


def test_every_torch_load_uses_weights_only():
    found, offenders = 0, []
    for path in SOURCES:
        for call in calls(ast.parse(path.read_text())):
            name = dotted(call.func)
            if name == "torch.load":
                found += 1
                if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in call.keywords):
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
            if name in ("pickle.load", "pickle.loads", "torch.serialization.load"):
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} ({name})")
    assert found >= 1 and not offenders, offenders


def test_user_driven_imports_are_only_plugins_and_model_packages():
    """Dynamic imports and code evaluation exist only where reviewed (see module docstring)."""
    allowed = {("kdframe/plugins.py", "importlib.import_module"),
               ("plugins/kdframe_hf/sources.py", "importlib.import_module")}
    found = set()
    for path in SOURCES:
        rel = str(path.relative_to(ROOT))
        for call in calls(ast.parse(path.read_text())):
            name = dotted(call.func)
            if name in ("importlib.import_module", "__import__", "eval", "exec", "compile", "runpy.run_path",
                        "runpy.run_module", "importlib.util.spec_from_file_location"):
                found.add((rel, name))
    assert found <= allowed, sorted(found - allowed)
