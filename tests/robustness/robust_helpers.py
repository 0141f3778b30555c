"""Helpers for the bad-input suite (issue 9).

Most cases call ``kdframe.cli.main`` in this process: the same code path as the ``kdframe``
command (plugin loading, argparse, error to exit-code mapping) without paying 5-15 s of imports
per case on a 2-core machine. The cases that need a real process (SIGINT, bf16 autocast state,
the console script) use ``conftest.run_cli``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from conftest import ROOT

SMOKE = ROOT / "recipes" / "smoke_tiny.toml"
GLUE = ROOT / "data" / "glue"
RUN_ARTEFACTS = ("checkpoint.pt", "summary.json", "student.pt")


@dataclass
class Result:
    rc: int
    out: str
    err: str


def kd(*args: str, env: dict[str, str] | None = None) -> Result:
    """``kdframe ARGS`` in this process; stdout and stderr captured."""
    from kdframe.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return Result(rc, out.getvalue(), err.getvalue())


def assert_bad_input(result: Result, *needles: str, out: Path | None = None) -> None:
    """Exit 2, every needle on stderr, no traceback, and no half-written run directory."""
    assert result.rc == 2, f"exit {result.rc}, expected 2; stderr:\n{result.err}"
    assert "Traceback" not in result.err, result.err
    assert "error:" in result.err, result.err
    for needle in needles:
        assert needle in result.err, f"{needle!r} not in stderr:\n{result.err}"
    if out is not None:
        assert_no_run_left(out)


def assert_no_run_left(out: Path) -> None:
    """The run directory does not exist, or holds no checkpoint, student or summary."""
    if out.exists():
        left = [name for name in RUN_ARTEFACTS if (out / name).exists()]
        assert not left, f"{out} holds {left} after bad input"


def smoke_raw() -> dict[str, Any]:
    """recipes/smoke_tiny.toml as a dict, its data path made absolute (so it can live in tmp_path)."""
    raw = tomllib.loads(SMOKE.read_text())
    raw["data"]["glue_dir"] = str(GLUE)
    return copy.deepcopy(raw)


def write_recipe(folder: Path, raw: dict[str, Any], name: str = "recipe.toml") -> Path:
    path = folder / name
    path.write_text(tomli_w.dumps(raw))
    return path


def all_finite(obj: Any) -> bool:
    """Every tensor and float in a (nested) checkpoint is finite."""
    import torch

    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True
