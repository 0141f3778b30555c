"""Recipe schema: structuring, every problem with its path, overrides, extends."""

import pytest

from conftest import ROOT, read_recipe
from kdframe.errors import RecipeError
from kdframe.recipe import Recipe, apply_override, resolve_stages, structure

BASE = {
    "data": {"task": "mrpc"},
    "teacher": {"init": "config"},
    "student": {"init": "teacher-layers", "layers": [0]},
    "stages": [{"losses": {"hard": 1.0}}],
}


def problems_of(raw):
    return structure(raw, Recipe)[1]


def test_valid_recipe_structures_with_defaults():
    recipe, problems = structure(BASE, Recipe)
    assert problems == []
    assert recipe.stages[0].lr == 3e-5 and recipe.stages[0].losses["hard"].weight == 1.0


def test_every_problem_is_reported_with_its_path_at_once():
    raw = {**BASE, "teacher": {"init": "config", "zz": 1},
           "stages": [{"lrr": 1, "schedule": "cosine", "batch_size": "many"}]}
    problems = problems_of(raw)
    assert "teacher: unknown key 'zz'; allowed: init, model, tokenizer, layers, config, train, seed" in problems
    assert any(p.startswith("stages[0]: unknown key 'lrr'; allowed: name, epochs") for p in problems)
    assert "stages[0].schedule: must be one of 'constant', 'linear'" in problems
    assert "stages[0].batch_size: expected int" in problems
    assert len(problems) == 4


def test_ranges_are_checked_with_paths():
    raw = {**BASE, "data": {"task": "mrpc", "max_length": 0},
           "stages": [{"lr": -1.0, "batch_size": 0, "warmup_ratio": 1.0}]}
    assert sorted(problems_of(raw)) == sorted([
        "data.max_length: must be > 0, got 0",
        "stages[0].lr: must be > 0, got -1.0",
        "stages[0].batch_size: must be > 0, got 0",
        "stages[0].warmup_ratio: must be < 1, got 1.0",
    ])


def test_missing_sections_are_named():
    assert problems_of({"data": {}}) == [
        "teacher: required key 'teacher' is missing",
        "student: required key 'student' is missing",
        "stages: required key 'stages' is missing",
    ]


def test_loss_shorthand_and_table_forms():
    raw = {**BASE, "stages": [{"losses": {"hid": 0.5, "pred": {"weight": 2, "temperature": 3.0}}}]}
    recipe, _ = structure(raw, Recipe)
    assert recipe.stages[0].losses["hid"].weight == 0.5
    assert recipe.stages[0].losses["pred"].params == {"temperature": 3.0}


def test_override_parses_toml_literals_and_bare_strings():
    raw = {"stages": [{"lr": 1.0}], "data": {}}
    apply_override(raw, "stages[0].lr=2e-5")
    apply_override(raw, "data.task=rte")
    apply_override(raw, "student.layers=[1, 3]")
    assert raw == {"stages": [{"lr": 2e-5}], "data": {"task": "rte"}, "student": {"layers": [1, 3]}}


@pytest.mark.parametrize("assignment, message", [
    ("stages[3].lr=1", "--set stages[3].lr: stages has 1 entries, no [3]"),
    ("stages[0].lr.x=1", "--set stages[0].lr.x: stages[0].lr is not a table"),
    ("nonsense", "expected PATH=VALUE"),
])
def test_bad_override_is_a_recipe_error(assignment, message):
    with pytest.raises(RecipeError) as info:
        apply_override({"stages": [{"lr": 1.0}]}, assignment)
    assert message in str(info.value)


def test_extends_merges_tables_and_replaces_lists(tmp_path):
    (tmp_path / "base.toml").write_text(
        'name = "base"\n[data]\ntask = "rte"\nmax_length = 64\n[teacher]\ninit = "config"\n'
        '[student]\ninit = "config"\n[[stages]]\nname = "a"\n[[stages]]\nname = "b"\n')
    (tmp_path / "top.toml").write_text('extends = "base.toml"\n[data]\nmax_length = 32\n[[stages]]\nname = "c"\n')
    recipe = read_recipe(tmp_path / "top.toml").recipe
    assert (recipe.data.task, recipe.data.max_length) == ("rte", 32)
    assert [s.name for s in recipe.stages] == ["c"]


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="extends itself"):
        read_recipe(tmp_path / "a.toml")


def test_relative_paths_resolve_against_the_recipe_that_sets_them(tmp_path):
    """The data source's path keys too, and a base recipe's paths against the base's directory."""
    (tmp_path / "glue").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "r.toml").write_text(
        '[data]\nglue_dir = "glue"\ncache_dir = "cache"\n[teacher]\ninit = "config"\ntokenizer = "glue"\n'
        '[student]\ninit = "config"\n[[stages]]\n')
    (tmp_path / "sub" / "top.toml").write_text('extends = "../r.toml"\n[data]\ncache_dir = "mine"\n')
    recipe = read_recipe(tmp_path / "r.toml").recipe
    assert recipe.data.params.glue_dir == str((tmp_path / "glue").resolve())
    top = read_recipe(tmp_path / "sub" / "top.toml").recipe
    assert top.data.params.glue_dir == recipe.data.params.glue_dir  # anchored at the base recipe
    assert top.teacher.tokenizer == str((tmp_path / "glue").resolve())
    assert top.data.cache_dir == str((tmp_path / "sub" / "mine").resolve())  # set by the top recipe
    (tmp_path / "sub" / "teacher").mkdir()  # a directory named like the literal: still the literal
    assert read_recipe(tmp_path / "sub" / "top.toml", 'student.tokenizer="teacher"').recipe.student.tokenizer == "teacher"
    overridden = read_recipe(tmp_path / "sub" / "top.toml", 'data.glue_dir="x"').recipe
    assert overridden.data.params.glue_dir == str((tmp_path / "sub" / "x").resolve())  # --set: the recipe's own


def test_strategy_params_structured_into_their_class(kdframe_host):
    recipe, _ = structure({**BASE, "stages": [{"mapping": {"strategy": "emd", "reg": 1},
                                                "weighting": {"strategy": "cost-attention", "normalize": "max"},
                                                "losses": {"pred": 1.0, "nope": 1.0}}]}, Recipe)
    _, _, problems = resolve_stages(recipe, kdframe_host.registry)
    assert any(p.startswith("stages[0].mapping: unknown key 'reg'") for p in problems), problems
    assert "stages[0].weighting.normalize: must be one of 'sum', 'softmax'" in problems
    assert any(p.startswith("stages[0].losses.nope: unknown loss strategy 'nope'; known: ") and "pred" in p
               for p in problems)


def test_lists_are_not_built_from_strings():
    problems = problems_of({**BASE, "student": {"init": "teacher-layers", "layers": "12"}})
    assert problems == ["student.layers: expected a list, got '12'"]


def test_unknown_mapping_lists_known_ones(make_host):
    host = make_host()
    recipe, _ = structure({**BASE, "stages": [{"mapping": {"strategy": "emdd"}, "losses": {"pred": 1.0}}]}, Recipe)
    _, _, problems = resolve_stages(recipe, host.registry)
    assert problems == ["stages[0].mapping: unknown mapping strategy 'emdd'; known: emd, one-to-one, pkd, uniform"]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    """Without loading models (the 12-layer teacher is an optional install): the schema, the
    strategies' params and the data source's keys. Grids and the bases that recipes extend (no
    [[stages]] of their own) are not run on their own."""
    text = path.read_text()
    if "[axes]" in text or "[[stages]]" not in text:
        pytest.skip("an ablation grid or a base recipe")
    assert read_recipe(path).problems == []


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("ablation_*.toml")), ids=lambda p: p.name)
def test_every_cell_of_a_shipped_grid_is_valid(path):
    """Each cell's recipe with the grid's, the task's and the variant's overrides, as `kdframe
    ablate` builds it (a grid that only fails when its cell comes up would fail hours in)."""
    from kdframe.grid import cell_label, grid_cells, load_grid

    cells = grid_cells(load_grid(path), path.parent)
    assert cells
    for cell in cells:
        assert read_recipe(cell["recipe"], *cell["overrides"]).problems == [], cell_label(cell)
