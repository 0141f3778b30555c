"""Exceptions that the CLI turns into exit codes: bad input is 2, a failed run is 1, an interrupted one 130."""

from __future__ import annotations


class KdframeError(Exception):
    """Bad input from the user (recipe, data, model, plugin, command line): exit code 2."""

    exit_code = 2


class RecipeError(KdframeError):
    """One or more problems in a recipe, each naming its field path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"invalid recipe {source}" if source else "invalid recipe"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class PluginError(KdframeError):
    """A plugin failed to load, registered something invalid, or returned something invalid."""


class DataError(KdframeError):
    """A data file is missing or malformed; the message names the file and line."""


class ModelError(KdframeError):
    """A model cannot be loaded or cannot be compared with the other model."""


class KdframeWarning(UserWarning):
    """Something in the input that works but likely not as meant (a setting with no effect): the
    CLI prints it as one line, ``kdframe: warning: ...``."""


class RunFailed(Exception):
    """Training failed after it started (non-finite loss, a crash in a step): exit code 1."""

    exit_code = 1


class Interrupted(Exception):
    """Ctrl-C (exit 130) or SIGTERM (exit 143) during training: a checkpoint was written; the
    message says how to resume."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
