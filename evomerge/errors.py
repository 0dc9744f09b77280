"""User-facing errors.

Every mistake a user can make (a bad field, a missing file, incompatible models) raises an
``EvomergeError`` whose message is one line naming the field or file and what was expected. The CLI
prints that line and exits with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""

    exit_code = 2


class ConfigError(EvomergeError):
    """A config, recipe or experiment file is invalid."""


class ModelError(EvomergeError):
    """A model folder is missing, unreadable or incompatible with the others."""


class DatasetError(ConfigError):
    """A fitness task's dataset cannot be loaded (not cached while offline, unreadable files)."""
