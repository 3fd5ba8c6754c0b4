"""Validation of user-chosen names that may end up in paths or URLs."""

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
