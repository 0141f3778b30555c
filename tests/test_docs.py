"""The docs keep up with the code: a section per hook, every recipe field and bundled strategy
param in the recipe reference, generated files fresh, relative links alive."""

import re
import subprocess
import sys
import typing

import attrs
import pytest

from conftest import ROOT
from kdframe import docgen, hookspecs
from kdframe.recipe import Recipe

DOCS = ROOT / "docs"
RECIPES = (DOCS / "recipes.md").read_text()
REGENERATE = "run `python -m kdframe.docgen` from the repository root"


def reachable_fields(cls: type, prefix: str = "") -> typing.Iterator[str]:
    """Paths of every attrs field reachable from ``cls`` (``[]`` for list items, ``<name>`` for
    table keys), walked independently of the generator so that a field it skips is caught."""
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        if field.metadata.get("source_params"):
            continue  # the data source's keys: test_every_bundled_data_source_key_is_documented
        path = prefix + field.name
        yield path
        tp = hints[field.name]
        step = {list: "[]", dict: ".<name>"}.get(typing.get_origin(tp), "")
        for inner in (tp, *typing.get_args(tp)):
            if attrs.has(inner):
                yield from reachable_fields(inner, f"{path}{step}.")


def test_every_hook_has_a_section():
    hooks = (DOCS / "hooks.md").read_text()
    names = [name for name in vars(hookspecs) if name.startswith("kdframe_")]
    assert len(names) > 20
    missing = [name for name in names if f"\n## {name}\n" not in hooks]
    assert not missing, f"docs/hooks.md has no section for {missing}; {REGENERATE}"


def test_every_recipe_field_is_documented():
    paths = list(reachable_fields(Recipe))
    assert "stages[].losses.<name>.weight" in paths and "teacher.train.lr" in paths
    missing = [path for path in paths if f"`{path}`" not in RECIPES]
    assert not missing, f"docs/recipes.md lacks {missing}; {REGENERATE}"


def test_every_documented_key_says_what_it_means():
    rows = [line for line in RECIPES.splitlines() if line.startswith("| `")]
    assert len(rows) > 60
    unexplained = [row.split(" | ")[0].strip("| ") for row in rows if not row.rstrip(" |").rsplit(" | ", 1)[1].strip()]
    assert not unexplained, f"docs/recipes.md: no meaning for {unexplained}; give the field a trailing # comment"


@pytest.mark.parametrize("strategy", docgen.bundled_strategies(), ids=lambda s: f"{s.slot}:{s.name}")
def test_every_bundled_strategy_param_is_documented(strategy):
    heading = f"\n### {strategy.slot} `{strategy.name}`\n"
    assert heading in RECIPES, f"docs/recipes.md has no section for {strategy.slot} {strategy.name!r}; {REGENERATE}"
    section = RECIPES.split(heading, 1)[1].split("\n### ", 1)[0]
    missing = [f.name for f in attrs.fields(strategy.params)
               if f"`{docgen.strategy_param_path(strategy, f.name)}`" not in section]
    assert not missing, f"docs/recipes.md: {strategy.slot} {strategy.name!r} lacks params {missing}; {REGENERATE}"


@pytest.mark.parametrize("source", [s for s in docgen.bundled()[0].data_sources()], ids=lambda s: s.name)
def test_every_bundled_data_source_key_is_documented(source):
    heading = f"\n### data source `{source.name}`\n"
    assert heading in RECIPES, f"docs/recipes.md has no section for data source {source.name!r}; {REGENERATE}"
    section = RECIPES.split(heading, 1)[1].split("\n### ", 1)[0]
    missing = [f.name for f in attrs.fields(source.params) if f"`data.{f.name}`" not in section]
    assert not missing, f"docs/recipes.md: data source {source.name!r} lacks keys {missing}; {REGENERATE}"


def test_every_hookspec_documents_when_it_is_called_with_an_example():
    for func in docgen.hook_functions():
        doc = docgen.HookDoc.of(func)  # raises without one Called: paragraph and an Example:: block
        assert doc.text and doc.called and "@hookimpl" in doc.example, func.__name__


@pytest.mark.parametrize("name", sorted(docgen.GENERATED))
def test_generated_docs_are_fresh(name):
    assert (DOCS / name).read_text() == docgen.GENERATED[name](), f"docs/{name} is stale; {REGENERATE}"


def test_docgen_check_and_write(tmp_path, capsys):
    assert docgen.main(["--docs", str(tmp_path), "--check"]) == 1 and not any(tmp_path.iterdir())
    assert docgen.main(["--docs", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(docgen.GENERATED)
    assert docgen.main(["--docs", str(tmp_path), "--check"]) == 0


@pytest.mark.parametrize("path", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(DOCS)))
def test_relative_links_resolve(path):
    """Every relative link in docs/, the committed ablation reports' plot links included."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    broken = [t for t in targets if not t.startswith(("http://", "https://")) and not (path.parent / t).exists()]
    assert not broken, f"{path.relative_to(DOCS.parent)} links to missing {broken}"


def test_pytest_reruns_only_the_last_failures(tmp_path):
    """The project's pytest settings keep pytest's cache: --lf reruns the failures, not everything."""
    (tmp_path / "test_x.py").write_text("def test_ok():\n    pass\n\n\ndef test_bad():\n    assert False\n")

    def pytest(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                               str(tmp_path), *args, str(tmp_path)], capture_output=True, text=True, timeout=120)

    assert "1 failed, 1 passed" in pytest().stdout
    again = pytest("--lf").stdout
    assert again.strip().splitlines()[-1].startswith("1 failed in") and "passed" not in again, again


def test_the_guides_recipe_is_the_shipped_one():
    import tomllib

    guide = (DOCS / "guide.md").read_text()
    block = guide.split("`recipes/emd_glue.toml`, the main job's recipe", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    assert tomllib.loads(block) == tomllib.loads((ROOT / "recipes" / "emd_glue.toml").read_text())
