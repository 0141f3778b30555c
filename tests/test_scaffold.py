"""``kdframe new-plugin``: the generated package passes its own contract test and its recipe
validates, all without installing it (PYTHONPATH), and bad names or places are bad input."""

import os
import re
import subprocess
import sys

import pytest

from conftest import run_cli
from kdframe.cli import main
from kdframe.errors import KdframeError
from kdframe.scaffold import new_plugin, plugin_names


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaffold")
    result = run_cli("new-plugin", "soft_min", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "kdframe validate" in result.stdout
    return out / "kdframe-soft-min"


def test_layout_and_imports(package):
    files = sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file())
    assert files == ["README.md", "data/glue/MRPC/dev.tsv", "data/glue/MRPC/train.tsv", "kdframe_soft_min/__init__.py",
                     "pyproject.toml", "recipes/smoke.toml", "tests/test_soft_min.py"]
    assert 'soft_min = "kdframe_soft_min"' in (package / "pyproject.toml").read_text()
    for path in ("kdframe_soft_min/__init__.py", "tests/test_soft_min.py"):
        imported = re.findall(r"^from (kdframe\S*) import", (package / path).read_text(), re.M)
        assert set(imported) <= {"kdframe.api", "kdframe.testing"}, path  # the public API only


def test_generated_test_passes(package):
    env = dict(os.environ, PYTHONPATH=str(package))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", str(package / "tests")],
                            cwd=package, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout


def test_generated_recipe_validates_offline(package, tmp_path):
    """As written, from another directory, with the hub out of reach and an empty cache."""
    recipe = package / "recipes" / "smoke.toml"
    env = dict(os.environ, PYTHONPATH=str(package), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               KDFRAME_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "kdframe.cli", "validate", str(recipe), "-p", "kdframe_soft_min"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "task mrpc: 64 train / 32 dev examples" in result.stdout
    assert "mapping soft-min, weighting none," in result.stdout and "recipe is valid" in result.stdout


def test_its_mapping_with_cost_attention_is_refused_at_validate(package):
    """soft-min does not keep the layer weights as marginals; cost attention divides by them."""
    result = subprocess.run(
        [sys.executable, "-m", "kdframe.cli", "validate", str(package / "recipes" / "smoke.toml"), "-p", "kdframe_soft_min",
         "--set", 'stages[0].weighting.strategy="cost-attention"'],
        env=dict(os.environ, PYTHONPATH=str(package)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("stages[0].weighting: 'cost-attention' needs flows whose row and column sums are the layer weights,"
            " and mapping 'soft-min' (plugin 'kdframe_soft_min') does not keep them") in result.stderr


def test_existing_directory_is_refused(package, capsys):
    assert main(["new-plugin", "soft_min", "--out", str(package.parent)]) == 2
    err = capsys.readouterr().err
    assert "kdframe-soft-min already exists" in err and "Traceback" not in err


@pytest.mark.parametrize(("name", "problem"), [
    ("Soft", "invalid name"), ("1map", "invalid name"), ("soft min", "invalid name"), ("soft-", "invalid name"),
    ("soft--min", "invalid name"), ("emd", "module named kdframe_emd is already installed"),
    ("one-to-one", "mapping 'one-to-one' is already registered"),
])
def test_bad_names_are_refused(tmp_path, name, problem):
    with pytest.raises(KdframeError, match=problem):
        new_plugin(name, tmp_path)
    assert not any(tmp_path.iterdir())


def test_names():
    names = plugin_names("soft_min2")
    assert (names.dist, names.module, names.entry, names.strategy) == (
        "kdframe-soft-min2", "kdframe_soft_min2", "soft_min2", "soft-min2")
