"""The kdframe command as a user meets it: plugins, validate, -p, exit codes and messages."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

SMOKE = str(ROOT / "recipes" / "smoke_tiny.toml")
BUNDLED = ["cost_attention", "costs", "emd", "glue", "hf", "losses", "pkd", "tinybert"]


def assert_bad_input(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_plugins_lists_every_bundled_plugin_with_its_strategies(cli):
    result = cli("plugins")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("│")}
    for name in BUNDLED:
        assert name in rows and "bundled" in rows[name]
    assert "mapping:emd" in rows["emd"] and "mapping:uniform" in rows["emd"]
    assert "weighting:cost-attention" in rows["cost_attention"]


def test_validate_smoke_recipe_prints_resolved_recipe_and_plan(cli):
    result = cli("validate", SMOKE)
    assert result.returncode == 0, result.stderr
    assert "Resolved recipe" in result.stdout and "recipe is valid" in result.stdout
    assert "initial att flow" in result.stdout and "initial hid flow" in result.stdout
    assert "stage 'distil': mapping emd, weighting cost-attention" in result.stdout


def test_misspelled_key_names_its_path_and_allowed_keys(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{SMOKE}"\n[data]\nmax_lenght = 3\n')
    result = cli("validate", str(recipe))
    assert_bad_input(result, "data: unknown key 'max_lenght'; allowed: task, source, max_length, train_limit, dev_limit, cache_dir, glue_dir")


def test_wrong_type_names_its_path(cli):
    result = cli("validate", SMOKE, "--set", 'stages[0].lr="fast"')
    assert_bad_input(result, "stages[0].lr: expected float")


def test_unknown_strategy_lists_the_known_ones(cli):
    result = cli("validate", SMOKE, "--set", "stages[0].mapping.strategy=emdd")
    assert_bad_input(result, "stages[0].mapping: unknown mapping strategy 'emdd'; known: emd, one-to-one, pkd, uniform")


def test_all_problems_are_reported_together(cli):
    result = cli("validate", SMOKE, "--set", "stages[0].lr=-1", "--set", "data.task=nope",
                     "--set", "stages[0].weighting.normalize=max")
    assert_bad_input(result, "stages[0].lr: must be > 0", "data.task: unknown task 'nope'; known: cola",
                     "stages[0].weighting.normalize: must be one of 'sum', 'softmax'")


def test_debug_shows_a_traceback(cli):
    result = cli("validate", SMOKE, "--set", "stages[0].lr=-1", "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_p_plugin_adds_a_mapping_that_validate_accepts(cli):
    listed = cli("plugins", "-p", "kdframe_test_reverse")
    assert "mapping:reverse" in listed.stdout and "-p" in listed.stdout
    result = cli("validate", SMOKE, "-p", "kdframe_test_reverse", "--set", "stages[0].mapping.strategy=reverse",
                     "--set", "stages[0].weighting.strategy=uniform")
    assert result.returncode == 0, result.stderr
    assert "mapping reverse" in result.stdout
    without = cli("validate", SMOKE, "--set", "stages[0].mapping.strategy=reverse")
    assert_bad_input(without, "unknown mapping strategy 'reverse'")


def test_p_no_blocks_a_bundled_plugin(cli):
    listed = cli("plugins", "-p", "no:emd")
    assert listed.returncode == 0
    assert "mapping:emd" not in listed.stdout and "cost_attention" in listed.stdout
    result = cli("validate", SMOKE, "-p", "no:emd")
    assert_bad_input(result, "unknown mapping strategy 'emd'; known: one-to-one, pkd")


def test_autoload_off_still_loads_bundled_plugins(cli):
    result = cli("plugins", env={"KDFRAME_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert result.returncode == 0 and "mapping:emd" in result.stdout


@pytest.mark.parametrize("module, fragment", [
    ("kdframe_test_misspelled", "kdframe_layer_maping"),
    ("kdframe_test_broken_import", "failed to import: RuntimeError: this plugin is broken on purpose"),
    ("kdframe_test_taken", "mapping strategy 'emd' is registered by two plugins"),
    ("kdframe_no_such_module", "kdframe_no_such_module"),
])
def test_bad_plugins_are_bad_input(cli, module, fragment):
    assert_bad_input(cli("plugins", "-p", module), fragment)


def test_trace_hooks_prints_hook_calls(cli):
    result = cli("plugins", env={"KDFRAME_TRACE_HOOKS": "1"})
    assert result.returncode == 0 and "kdframe_" in result.stderr


def test_usage_errors_exit_2(cli):
    assert cli("frobnicate").returncode == 2
    assert cli("run").returncode == 2


def test_p_naming_an_installed_plugin_is_harmless(cli):
    result = cli("plugins", "-p", "kdframe_emd")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("mapping:emd") == 1


HEAVY = ("torch", "transformers", "datasets", "accelerate", "ot", "scipy", "numpy")


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["plugins"], ["plugins", "--json"], ["schema"],
                                  ["validate", "BAD"]],
                         ids=["help", "run-help", "plugins", "plugins-json", "schema", "validate-bad-recipe"])
def test_commands_that_train_nothing_import_no_heavy_package(args, tmp_path):
    """They answer in a fraction of a second: no torch, transformers, POT or scipy import (seconds
    of CPU each). Installed plugins are loaded too (the example plugin, when installed)."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ntask = "mrpcc"\n[teacher]\n[student]\n[[stages]]\n')
    args = [str(bad) if a == "BAD" else a for a in args]
    code = ("import sys\nfrom kdframe.cli import main\n"
            f"code = main({args!r})\n"
            f"print(code, sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))\n")
    env = {**os.environ, "KDFRAME_DISABLE_PLUGIN_AUTOLOAD": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    last = done.stdout.strip().splitlines()[-1]
    assert last == f"{2 if args[0] == 'validate' else 0} []", done.stdout[-2000:] + done.stderr[-2000:]


def test_flow_tables_of_a_12_layer_teacher_stay_readable_when_piped():
    from conftest import run_cli

    result = run_cli("validate", SMOKE, "--set", "teacher.config.num_hidden_layers=12",
                     "--set", "student.layers=[2, 5, 8, 11]")
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("initial att flow (student layer x teacher layer), first dev batch:\n", 1)[1]
    header, *rows = table.splitlines()[:5]
    assert header.split() == ["S\\T", *map(str, range(1, 13))]
    for i, row in enumerate(rows, 1):
        cells = row.split()
        assert len(cells) == 13 and cells[0] == str(i) and "…" not in row and len(row) <= 80
        assert abs(sum(float(c) for c in cells[1:] if c != ".") - 0.25) < 5e-3  # its weight, to 3 decimals a cell


def test_a_setting_without_effect_is_warned_about_in_one_line(cli):
    recipe = str(ROOT / "recipes" / "smoke_tiny.toml")
    warned = cli("validate", recipe, "--set", "stages[0].weighting.temperature=2.0")
    assert warned.returncode == 0
    assert ('kdframe: warning: stages[0].weighting.temperature has no effect with normalize = "sum" (it is the'
            ' softmax\'s T_emd): drop it, or set normalize = "softmax"\n') in warned.stderr
    assert "warning" not in cli("validate", recipe, "--set", 'stages[0].weighting.normalize="softmax"',
                                "--set", "stages[0].weighting.temperature=2.0").stderr


def test_cache_lists_removes_what_no_run_used_and_runs_recompute_it(tmp_path, capsys):
    """``kdframe cache`` on a real cache (a KD run: a fine-tuned teacher, a logits feature set):
    entries with what they are; a run marks what it opens as used; --remove --unused-for takes
    only the stale feature set, --dry-run nothing; the next run computes the features again and
    still takes the cached teacher."""
    import json
    import time

    from kdframe.cli import main
    from kdframe.library import run

    cache = tmp_path / "cache"
    kd = str(ROOT / "recipes" / "smoke" / "kd.toml")
    sets = ["teacher_cache.enabled=true", 'teacher_cache.storage="disk"', f'data.cache_dir="{cache}"']
    summary = run(kd, overrides=sets, out=str(tmp_path / "a"), progress="off").summary
    key = summary["stages"]["distil"]["teacher_cache"]["key"]
    teacher, = (cache / "teachers").glob("*.pt")
    features = cache / "teacher-features" / key
    capsys.readouterr()

    def cache_cli(*args):
        code = main(["cache", "--dir", str(cache), *args])
        return code, capsys.readouterr()

    code, out = cache_cli()
    assert code == 0
    assert f"  {teacher.name}  " in out.out and "also linked from 1 run directories" in out.out
    assert f"  {key}  " in out.out and "mrpc train, 64 examples, logits, fp32" in out.out
    assert "\nother: " in out.out and "\n  tokens  " in out.out  # data plugins' directories: listed, not removable
    month_ago = time.time() - 30 * 86400
    for path in (teacher, features / "key.json"):
        os.utime(path, (month_ago, month_ago))
    run(kd, overrides=[*sets, "seed=2"], out=str(tmp_path / "b"), progress="off")  # opens both: used now
    code, out = cache_cli("--remove", "teachers", "--remove", "teacher-features", "--unused-for", "7")
    assert code == 0 and out.out.splitlines()[-1].startswith("0 entries")
    os.utime(features / "key.json", (month_ago, month_ago))
    code, out = cache_cli("--remove", "teacher-features", "--unused-for", "7", "--dry-run")
    assert code == 0 and f"would remove teacher-features/{key}" in out.out and features.is_dir()
    code, out = cache_cli("--remove", "teacher-features", "--unused-for", "7")
    assert code == 0 and f"removed teacher-features/{key}" in out.out
    assert not features.exists() and teacher.exists()
    summary = run(kd, overrides=[*sets, "seed=3"], out=str(tmp_path / "c"), progress="off").summary
    assert summary["stages"]["distil"]["teacher_cache"]["misses"] == 64
    assert json.loads((tmp_path / "c" / "teacher.json").read_text())["source"] == f"cache {teacher}"


@pytest.mark.parametrize(("args", "message"), [
    (["--dir", "{missing}"], "--dir: no cache directory at "),
    (["--remove", "teachers", "--unused-for", "-1"], "--unused-for: must be >= 0 days, got -1"),
    (["--dry-run"], "--unused-for and --dry-run go with --remove"),
])
def test_cache_refuses_bad_arguments(tmp_path, capsys, args, message):
    from kdframe.cli import main

    code = main(["cache", *(a.format(missing=tmp_path / "none") for a in args)])
    assert code == 2 and capsys.readouterr().err.startswith(f"kdframe: error: {message}")


def test_cache_listing_survives_a_file_that_vanishes_while_listed(tmp_path, monkeypatch):
    """A running run renames its feature files' temp names while ``kdframe cache`` walks them."""
    from pathlib import Path

    from kdframe.caches import cache_inventory

    features = tmp_path / "teacher-features" / "k"
    features.mkdir(parents=True)
    (features / "0.pt").write_bytes(b"x" * 10)
    (features / "1.pt.tmp").write_bytes(b"x" * 5)
    looks = []

    def gone_after_one_look(original):
        def look(path, *args, **kwargs):
            if path.name.endswith(".tmp"):
                looks.append(path)
                if len(looks) > 1:  # renamed away after the first look at it
                    raise FileNotFoundError(2, "No such file or directory", str(path))
            return original(path, *args, **kwargs)
        return look

    monkeypatch.setattr(Path, "stat", gone_after_one_look(Path.stat))
    monkeypatch.setattr(Path, "lstat", gone_after_one_look(Path.lstat))
    entry, = cache_inventory(tmp_path)
    assert (entry.kind, entry.bytes, entry.about) == ("teacher-features", 10, "no key.json") and len(looks) > 1
