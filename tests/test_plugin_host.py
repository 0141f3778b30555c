"""The plugin host is pluggy's: registration order, wrappers and tracing on every hook, names
claimed once. And the core's own shape: no import circles, no GLUE or Hugging Face names."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, INSTALLED_PLUGINS, ROOT, run_cli
from kdframe.api import hookimpl
from kdframe.step import DistillStep
from kdframe.testing import make_context, random_features

SMOKE = str(ROOT / "recipes" / "smoke_tiny.toml")
ACME_SITE = FIXTURES / "acme_site"  # an installed distribution, acme-onnx, with a kdframe entry point


def test_third_party_loader_sorting_before_hf_is_used():
    """Entry point ``acme_onnx`` sorts before the bundled ``hf``; it still answers first (third-party
    plugins register after the bundled ones, and hf's catch-all loader is trylast)."""
    env = {"PYTHONPATH": os.pathsep.join([str(ACME_SITE), str(FIXTURES)]), **INSTALLED_PLUGINS}
    listed = run_cli("plugins", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "acme_onnx" in listed.stdout and "model-source:acme" in listed.stdout
    result = run_cli("validate", SMOKE, "--set", 'teacher.init="pretrained"', "--set", 'teacher.model="acme:tiny"',
                     "--set", 'teacher.tokenizer=""', env=env)
    assert result.returncode == 0, result.stderr
    assert "teacher: acme acme:tiny: bert, 4 layers" in result.stdout


def test_unregistered_model_source_is_bad_input(cli):
    result = cli("validate", SMOKE, "--set", 'teacher.init="pretrained"', "--set", 'teacher.model="acme:tiny"')
    assert result.returncode == 2
    assert "teacher.model: unknown model source 'acme' in 'acme:tiny'; known: builtin, memory, package" in result.stderr


def test_two_plugins_claiming_one_task_is_bad_input_naming_both(cli):
    result = cli("validate", SMOKE, "-p", "kdframe_test_task_clash")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "task 'mrpc' is registered by two plugins" in result.stderr
    assert "'glue'" in result.stderr and "'kdframe_test_task_clash'" in result.stderr


class Doubler:
    """Wraps the merged hooks: sees every plugin's answers and changes them."""

    def __init__(self):
        self.seen: dict[str, list] = {}

    @hookimpl(wrapper=True)
    def kdframe_loss_terms(self, ctx):
        answers = yield
        self.seen["loss_terms"] = [sorted(answer) for answer in answers]
        return [{name: term * 2 for name, term in answer.items()} for answer in answers]

    @hookimpl(wrapper=True)
    def kdframe_layer_costs(self, ctx):
        answers = yield
        self.seen["layer_costs"] = [sorted(answer) for answer in answers]
        return answers + [{"extra": next(iter(answers[0].values())) * 0}]


def test_wrappers_see_and_change_merged_hooks(make_host):
    doubler = Doubler()
    plain, wrapped = make_host(), make_host(doubler)
    losses = {"att": {}, "hid": {}, "pred": {}}
    outs = []
    for host in (plain, wrapped):
        ctx = make_context(host, 2, 4, mapping="emd", losses=losses)
        torch.manual_seed(0)
        host.extra_parameters(ctx)
        host.stage_start(ctx)
        student, teacher = random_features(2, 8, 2, seed=1, grad=True), random_features(4, 12, 2, seed=2)
        outs.append(DistillStep(host, ctx).from_features(student, teacher, {"labels": torch.tensor([0, 1, 1])}, {}))
    assert sorted(doubler.seen["loss_terms"]) == [["att", "hid"], ["pred"]]  # costs' terms, losses' term
    assert sorted(outs[1].flows) == ["att", "extra", "hid"]  # the wrapper's cost kind got a flow too
    for name in losses:
        torch.testing.assert_close(outs[1].terms[name], 2 * outs[0].terms[name])
    torch.testing.assert_close(outs[1].loss, 2 * outs[0].loss)


def test_tracing_prints_every_hook_call(tmp_path):
    """A short run with KDFRAME_TRACE_HOOKS=1 and a plugin recording every hook it is called for:
    every recorded hook is in the trace, among them those the old host called around pluggy."""
    record = tmp_path / "called.txt"
    result = run_cli("run", SMOKE, "--out", str(tmp_path / "run"), "--progress", "off", "-p", "kdframe_test_recorder",
                     "--set", "stages[0].max_steps=2", "--set", "teacher.train.max_steps=2",
                     env={"KDFRAME_TRACE_HOOKS": "1", "KDFRAME_TEST_RECORD": str(record)})
    assert result.returncode == 0, result.stderr[-3000:]
    called = set(record.read_text().split())
    traced = {line.split()[0] for line in result.stderr.splitlines() if line.rstrip().endswith("[hook]")}
    assert {"kdframe_register", "kdframe_layer_costs", "kdframe_loss_terms", "kdframe_extra_parameters",
            "kdframe_state_dict", "kdframe_step_end", "kdframe_run_end"} <= called
    assert len(called) >= 18
    assert called <= traced, f"called but not traced: {sorted(called - traced)}"


def test_the_suite_ignores_installed_plugins(tmp_path):
    """A third-party plugin installed in the environment (here one that claims the mapping name
    emd, so every command that loads it exits 2) does not reach the test suite."""
    site = tmp_path / "site"
    dist = site / "kdframe_clash-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kdframe-clash\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kdframe]\nclash = kdframe_test_taken\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(FIXTURES)])}
    env.pop("KDFRAME_DISABLE_PLUGIN_AUTOLOAD")  # a developer's shell
    installed = subprocess.run([sys.executable, "-m", "kdframe.cli", "plugins"], env=env, capture_output=True,
                               text=True, timeout=120)
    assert installed.returncode == 2 and "registered by two plugins" in installed.stderr  # it is installed
    suite = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_recipe.py",
                            "tests/test_cli.py::test_plugins_lists_every_bundled_plugin_with_its_strategies"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert suite.returncode == 0, suite.stdout[-3000:]


# -- the core's shape -----------------------------------------------------------------------------

def core_modules() -> dict[str, ast.Module]:
    return {f"kdframe.{path.stem}": ast.parse(path.read_text()) for path in (ROOT / "kdframe").glob("*.py")
            if path.stem != "__init__"}


def kdframe_imports(tree: ast.Module) -> set[str]:
    """Every kdframe module a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("kdframe.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdframe":
            if node.module == "kdframe":
                found |= {f"kdframe.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return found


def test_no_import_circles_in_the_core():
    graph = {name: kdframe_imports(tree) & set(core_modules()) for name, tree in core_modules().items()}

    def cycle_from(start: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return (*path, nxt)
            if nxt not in path:
                found = cycle_from(start, (*path, nxt))
                if found:
                    return found
        return None

    cycles = [cycle for name in graph if (cycle := cycle_from(name, (name,)))]
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_report_reads_runs_without_torch():
    code = "import sys, kdframe.report; print('torch' in sys.modules, 'kdframe.trainer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["False", "False"]


def code_names(tree: ast.Module) -> set[str]:
    """Identifiers, attribute names and string literals of a module, docstrings left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.add(node.value)
    return names


@pytest.mark.parametrize("needle", ["glue", "token_type", "package:", "builtin:", "transformers"])
def test_the_core_names_no_data_or_model_family(needle):
    """What GLUE or Hugging Face models need lives in their plugins. The scaffold is exempt: it writes
    a user's plugin project whose example recipe uses the bundled plugins."""
    offenders = {module: sorted(n for n in code_names(tree) if needle in n.lower())
                 for module, tree in core_modules().items() if module != "kdframe.scaffold"}
    assert not {m: n for m, n in offenders.items() if n}
