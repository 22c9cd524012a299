"""The errors users meet. Each is raised where the fault is found, with a one-line message that
names the bad value and the fix; the command line (``tokenmorph.cli.main``) prints it as one line
and exits with status 2. Anything else that escapes is a bug and keeps its traceback.

    TokenmorphError          base of every user-facing error
    ├── ConfigError          a bad key, value or combination in a config, an override or a flag
    ├── DataError            data that cannot be found or read
    ├── ModelError           a model (teacher, backbone) that cannot be built or loaded as asked
    ├── CheckpointError      a checkpoint that is missing, unreadable, of another kind or unfit
    └── TrainingError        a run that cannot go on (non-finite loss, a signal, no space left)
"""

from __future__ import annotations

__all__ = [
    "TokenmorphError",
    "ConfigError",
    "DataError",
    "ModelError",
    "TeacherError",
    "CheckpointError",
    "TrainingError",
]


class TokenmorphError(Exception):
    """A user-facing error: its message is one line that says what is wrong and how to fix it."""


class ConfigError(TokenmorphError, ValueError):
    """A configuration or command-line problem; the message names the key (or flag) and the fix."""


class DataError(TokenmorphError, ValueError):
    """A data problem; the message names the path and the fix."""


class ModelError(TokenmorphError, RuntimeError):
    """A model cannot be built or loaded as asked (missing weights or package, bad name or
    option)."""


TeacherError = (
    ModelError  # the name teachers raise under (kept: it reads better at the raise sites)
)


class CheckpointError(TokenmorphError, RuntimeError):
    """A checkpoint is missing, unreadable, of another kind, or does not fit the run or command."""


class TrainingError(TokenmorphError, RuntimeError):
    """A run cannot go on; the message says why, at which step, and what was saved."""
