"""Nothing reports success that did nothing: exports that write nothing or cannot write, plugins
that exit, names that block nothing, an --out that is a file."""

import pytest
from robust_helpers import SMOKE, assert_bad_input, kd

from conftest import run_cli


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli("run", SMOKE, "--out", str(out), "--progress", "off", "--set", "stages[0].max_steps=2")
    assert result.returncode == 0, result.stderr
    return out


def test_export_onto_an_existing_file(finished_run, tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    assert_bad_input(kd("export", finished_run, target), f"export: {target} is a file")
    assert target.read_text() == "keep me"


def test_export_that_writes_nothing_fails(finished_run, tmp_path):
    result = kd("export", finished_run, tmp_path / "out", "-p", "kdframe_test_lazy_export")
    assert result.rc == 1 and "Traceback" not in result.err
    assert result.err.strip() == f"kdframe: run failed: export: nothing was written to {tmp_path / 'out'}"


@pytest.mark.parametrize("code", ["0", "3", "a text"])
def test_plugin_exiting_at_import_is_bad_input(code):
    result = kd("validate", SMOKE, "-p", "kdframe_test_exits", env={"KDFRAME_TEST_EXIT": f"import:{code}"})
    assert_bad_input(result, "plugin 'kdframe_test_exits' (-p) failed to import: SystemExit:")
    assert len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize("code", ["0", "a text"])
def test_plugin_exiting_in_a_hook_is_a_failed_run(code):
    result = kd("validate", SMOKE, "-p", "kdframe_test_exits", env={"KDFRAME_TEST_EXIT": f"hook:{code}"})
    assert result.rc == 1 and result.out == "" and "Traceback" not in result.err
    expected = 0 if code == "0" else code
    assert result.err.strip() == f"kdframe: run failed: plugin code called exit({expected!r})"


def test_blocking_a_plugin_that_is_not_installed_is_bad_input():
    result = kd("validate", SMOKE, "-p", "no:doesnotexist")
    assert_bad_input(result, "-p no:doesnotexist: no installed plugin is called 'doesnotexist'", "installed: ")
    assert "costs" in result.err


def test_ablate_out_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    assert_bad_input(kd("ablate", "recipes/ablation_smoke.toml", "--out", target), f"--out {target} is a file")
