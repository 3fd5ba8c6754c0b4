"""Validation of user-chosen names that may end up in paths or URLs, and of free text kept in the registry."""

from __future__ import annotations

import re

from mmer_cl.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_name(name: str, what: str = "name") -> str:
    """Accept 1-64 characters of letters, digits, ``.``, ``_``, ``-``, not starting with a dot or dash."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (it becomes part of file paths)"
        )
    return name


MAX_ACTOR = 128
MAX_TAG_VALUE = 1000
MAX_DESCRIPTION = 10_000


def validate_text(value: str, what: str, max_len: int, *, empty: bool = True) -> str:
    """Accept printable text of at most ``max_len`` characters: no newline, tab, escape sequence, NUL,
    bidirectional override or other control or format character, which could forge a line of
    ``mmer history`` or drive the terminal that shows it."""
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be text, got {type(value).__name__}")
    if len(value) > max_len:
        raise ConfigError(f"{what} is {len(value)} characters long; the limit is {max_len}")
    if not empty and not value.strip():
        raise ConfigError(f"{what} must not be empty")
    for position, char in enumerate(value):
        if not char.isprintable():
            raise ConfigError(f"{what} holds the control character {char!r} at position {position}; use printable "
                              "text only (no newlines, tabs or escape sequences)")
    return value


def validate_actor(actor: str) -> str:
    """Who made a change, as recorded in the audit log: 1-128 printable characters."""
    return validate_text(actor, "actor name (--actor / MMER_ACTOR)", MAX_ACTOR, empty=False)
