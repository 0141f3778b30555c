import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_GLUE = ROOT.parent / "shared" / "data" / "glue"

sys.path.insert(0, str(FIXTURES))
# Hermetic: the suite sees the bundled plugins and what a test loads itself (-p, inline objects),
# never whatever else is installed in the environment; the processes it starts inherit this. The
# tests of installed plugins say so (INSTALLED_PLUGINS).
os.environ["KDFRAME_DISABLE_PLUGIN_AUTOLOAD"] = "1"
INSTALLED_PLUGINS = {"KDFRAME_DISABLE_PLUGIN_AUTOLOAD": ""}
# Tiny models are all overhead: one thread per process is faster, above all on a shared machine,
# and the subprocesses the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tokenisation and teacher caches go to a per-session temp dir, never ~/.cache."""
    os.environ["KDFRAME_CACHE"] = str(tmp_path_factory.getbasetemp() / "kdframe-cache")


@functools.cache
def bundled_host():
    """The installed plugins, loaded once per test session (for tests that only read the registry)."""
    from kdframe.plugins import load_plugins

    return load_plugins()


def read_recipe(path, *overrides):
    """``kdframe.recipe.load_recipe`` with the installed plugins: a LoadedRecipe."""
    from kdframe.recipe import load_recipe

    return load_recipe(path, list(overrides), bundled_host().registry)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run the kdframe CLI in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(FIXTURES), **(env or {})}
    return subprocess.run([sys.executable, "-m", "kdframe.cli", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def cli_env(tmp_path_factory):
    """The environment of a CLI subprocess started by a session-scoped fixture, which runs before
    the autouse cache fixture: the session's cache explicitly, and one thread (tiny models run
    several times faster than with threads fighting over shared cores)."""
    return {"KDFRAME_CACHE": str(tmp_path_factory.getbasetemp() / "kdframe-cache"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def smoke_ablation(tmp_path_factory):
    """recipes/ablation_smoke.toml run by the local executor: (the CLI's result, the ablation dir)."""
    import time

    out = tmp_path_factory.mktemp("ablation") / "smoke"
    started = time.monotonic()
    result = run_cli("ablate", str(ROOT / "recipes" / "ablation_smoke.toml"), "--out", str(out), "--progress", "plain",
                     env=cli_env(tmp_path_factory))
    print(f"smoke grid: {time.monotonic() - started:.1f}s")
    return result, out


@pytest.fixture
def cli(capsys, monkeypatch):
    """Call the kdframe CLI in-process (fast); returns returncode, stdout and stderr."""
    from types import SimpleNamespace

    from kdframe.cli import main

    def call(*args: str, env: dict | None = None):
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        code = main(list(args))
        captured = capsys.readouterr()
        for key in env or {}:
            monkeypatch.delenv(key)
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return call


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A tiny lowercase BERT WordPiece tokenizer (fast): every word splits into letters and digits."""
    import string

    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tokenizer")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits,
              *(f"##{c}" for c in string.ascii_lowercase + string.digits), *string.punctuation]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(folder))
