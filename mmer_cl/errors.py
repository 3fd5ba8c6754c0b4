"""Exceptions mmer-cl raises on purpose.

Every message says what went wrong *and* what to do about it; the CLI prints
the message and exits with status 2 (bad input) for these.
"""


class MmerError(Exception):
    """Base class of every error mmer-cl raises deliberately."""


class CheckpointError(MmerError):
    """A checkpoint cannot be read: missing files, pickle weights, NaN/Inf."""


class KeyMappingError(MmerError):
    """The checkpoint's LLM part does not line up with the base model."""


class ConfigError(MmerError):
    """A merge or mask parameter is out of range or unknown."""
