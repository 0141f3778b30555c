"""``kdframe schema`` and ``kdframe plugins --json``: the schema accepts every shipped recipe (each
file as written, and merged with what it extends) and refuses what ``validate`` refuses key by key.
The truth for "refuses" is kdframe's own structuring: each bad recipe below is also checked to be
refused by it, so the two cannot drift apart unnoticed."""

from __future__ import annotations

import copy
import json
import tomllib

import jsonschema
import pytest
import tomli_w
from conftest import ROOT, bundled_host

from kdframe.errors import RecipeError
from kdframe.recipe import load_recipe, read_with_extends
from kdframe.schema import recipe_schema

RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.toml") if "[axes]" not in p.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = recipe_schema(bundled_host().registry)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_matches_the_schema(path, validator) -> None:
    raw = tomllib.loads(path.read_text())
    assert not list(validator.iter_errors(raw)), [e.message for e in validator.iter_errors(raw)]
    merged, _ = read_with_extends(path)
    assert not list(validator.iter_errors(merged))


def smoke() -> dict:
    merged, _ = read_with_extends(ROOT / "recipes" / "smoke_tiny.toml")
    return copy.deepcopy(merged)


def set_path(raw: dict, path: list, value) -> dict:
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return raw


@pytest.mark.parametrize(("path", "value"), [
    (["nmae"], "x"),  # a typo'd top-level key
    (["stages", 0, "lrr"], 1e-3),  # a typo'd stage key
    (["stages", 0, "lr"], -1.0),  # out of range
    (["stages", 0, "epochs"], "two"),  # a wrong type
    (["stages", 0, "mapping"], "emdd"),  # an unknown strategy
    (["stages", 0, "mapping"], {"strategy": "pkd", "choise": "last"}),  # a typo'd param
    (["stages", 0, "mapping"], {"strategy": "pkd", "choice": "first"}),  # a param outside its choices
    (["stages", 0, "losses", "hidd"], 0.1),  # an unknown loss term
    (["stages", 0, "losses", "pred"], {"weight": 1.0, "temprature": 2.0}),
    (["stages", 0, "losses", "hid"], -0.5),
    (["data", "glue_dirr"], "x"),  # no source has this key
    (["data", "train_file"], "x.csv"),  # a text key beside GLUE's glue_dir
    (["data", "task"], "mrpcc"),  # not a GLUE task
    (["precision"], "fp64"),
], ids=lambda v: str(v))
def test_the_schema_refuses_what_validate_refuses(path, value, validator, tmp_path) -> None:
    raw = set_path(smoke(), path, value)
    assert list(validator.iter_errors(raw)), f"the schema accepts {path} = {value!r}"
    (tmp_path / "r.toml").write_text(tomli_w.dumps(raw))
    try:
        problems = load_recipe(tmp_path / "r.toml", [], bundled_host().registry).problems
    except RecipeError as exc:
        problems = exc.problems
    assert problems


def test_a_text_recipe_and_strategy_params_match(validator) -> None:
    raw = smoke()
    raw["data"] = {"source": "text", "task": "reviews", "train_file": "t.csv", "dev_fraction": 0.1,
                   "labels": ["a", "b"], "metrics": ["macro_f1"], "where": {"source": ["x"]}}
    raw["stages"][0]["mapping"] = {"strategy": "pkd", "choice": "last"}
    raw["stages"][0]["losses"] = {"pred": {"weight": 1.0, "temperature": 2.0}, "hid": 0.1}
    assert not list(validator.iter_errors(raw)), [e.message for e in validator.iter_errors(raw)]


def test_schema_command_writes_the_schema(cli, tmp_path) -> None:
    result = cli("schema", "--out", str(tmp_path / "schema.json"))
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "schema.json").read_text())
    assert written["$schema"].endswith("2020-12/schema") and "stages" in written["properties"]
    printed = cli("schema")
    assert json.loads(printed.stdout) == written


def test_plugins_json_lists_what_is_registered(cli) -> None:
    result = cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert {p["name"] for p in listed["plugins"]} >= {"emd", "glue", "text", "hf", "losses"}
    pkd = next(s for s in listed["strategies"] if s["slot"] == "mapping" and s["name"] == "pkd")
    assert pkd["fixed"] and pkd["sparse_flow"] and not pkd["keeps_marginals"] and pkd["plugin"] == "pkd"
    assert pkd["params"]["properties"]["choice"] == {"enum": ["skip", "last"], "default": "skip",
                                                     "description": pkd["params"]["properties"]["choice"]["description"]}
    assert next(t for t in listed["tasks"] if t["name"] == "mrpc")["metrics"] == ["f1", "accuracy"]
    assert next(d for d in listed["data_sources"] if d["name"] == "text")["defines_tasks"] is True
    assert {m["name"] for m in listed["model_sources"]} >= {"package", "builtin"}
