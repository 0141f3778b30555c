"""How this kdframe was started, so that the commands it prints (resume hints) work when pasted."""

from __future__ import annotations

import sys
from pathlib import Path


def kdframe_command() -> list[str]:
    """The kdframe script as it was called (``.venv/bin/kdframe`` works without an activated
    environment), else this interpreter with ``-m kdframe.cli``."""
    if Path(sys.argv[0]).name == "kdframe":
        return [sys.argv[0]]
    return [sys.executable, "-m", "kdframe.cli"]
