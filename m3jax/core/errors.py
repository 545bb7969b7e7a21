"""The one error family: every error a user can fix derives from `M3JaxError`.

Each module raises its own subclass (ConfigError, DataError, CheckpointFormatError, ExportError, EvalDataError,
UsageError, NonFiniteLossError), named for what was wrong, with a message that names the file/line or config field
and what was expected. `train.py` and the `m3jax` command catch `M3JaxError` alone and print that message without a
traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class M3JaxError(Exception):
    """Something the user can fix (input, paths, config values); the message says what and where."""


class ConfigError(M3JaxError, ValueError):
    """A config field has a value m3jax cannot run with; the message names the field (`config.<field>=...`)."""
