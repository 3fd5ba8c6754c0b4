"""Exceptions mmer-cl raises on purpose.

Every message says what went wrong *and* what to do about it. Each class
carries the exit status the CLI uses for it: 2 for bad input (fix the
command), 1 for a failure (damage found, a resource such as the disk or the
database failing). This module imports nothing, so ``storage`` and
``registry`` can derive their errors from :class:`MmerError` without knowing
anything else of mmer-cl.
"""


class MmerError(Exception):
    """Base class of every error mmer-cl raises deliberately."""

    exit_code = 2


class CheckpointError(MmerError):
    """A checkpoint cannot be read: missing files, pickle weights, NaN/Inf."""


class KeyMappingError(MmerError):
    """The checkpoint's LLM part does not line up with the base model."""


class ConfigError(MmerError):
    """A merge or mask parameter is out of range or unknown."""


class StoreDamagedError(MmerError):
    """The store's registry or blob location is damaged, missing or belongs to another store."""

    exit_code = 1


class ExportRefusedError(MmerError):
    """An export target is not one mmer may write or replace."""
