"""Errors a user can fix.

Every exception raised for bad user input derives from `SlimtuneError`. The CLI prints its message and
exits with status 2, without a traceback; the message must name the bad value and say how to fix it.
"""

from __future__ import annotations


class SlimtuneError(Exception):
    """Base class for errors caused by user input (config, data, paths, model names)."""


class ConfigError(SlimtuneError):
    """The config file or a command-line override is invalid."""


class DataError(SlimtuneError):
    """A dataset file is missing, empty or has a malformed row (message names `file:line`)."""


class ModelLoadError(SlimtuneError):
    """A base model could not be found or loaded."""


class TargetError(SlimtuneError):
    """Adapter targets match no module of the model, or name modules that are not linear layers."""


class AdapterError(SlimtuneError):
    """An adapter directory is missing, malformed or does not fit the base model."""


class OutputWriteError(SlimtuneError):
    """Writing run files failed (disk full, permissions); the newest complete checkpoint is kept."""
