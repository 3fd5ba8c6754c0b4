"""Database URLs in messages: never a password, whatever the URL looks like.

:func:`shown_url` masks the password of any ``scheme://user:password@host/...``
URL by its own rule (the user information is everything between ``://`` and
the last ``@`` before the query), so a URL SQLAlchemy cannot parse (a
non-numeric port, a broken IPv6 host, an unknown driver, a password holding
``@`` or ``/``) is masked as well as one it can; ``password=`` (and similar)
query parameters are masked too.

A driver's own error text may quote part of the URL (``failed to resolve host
'w9secret@127.0.0.1'`` when the password holds an ``@``). So every URL that
mmer opens is first given to :func:`remember`, and :func:`scrub` replaces each
remembered secret (and its pieces) in any text; :func:`mmer_cl.runtime.failures.describe_failure`
scrubs every message the CLI prints.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import quote, unquote

MASK = "***"
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "sslpassword", "access_key", "secret_key")
MIN_PIECE = 4  # pieces of a password shorter than this are masked only inside the URL itself

_QUERY_SECRET = re.compile(r"(?i)([?&;](?:%s)=)([^&;#]*)" % "|".join(SECRET_QUERY_KEYS))
_remembered: set[str] = set()
_lock = threading.Lock()


def _parts(url: str) -> tuple[str, str | None, str]:
    """``(scheme://, userinfo or None, rest)`` of ``url``, without parsing anything else."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    head, q, query = rest.partition("?")
    at = head.rfind("@")
    if at < 0:
        return scheme + sep, None, rest
    return scheme + sep, head[:at], head[at + 1:] + q + query


def secrets_of(url: str) -> set[str]:
    """Every string of ``url`` that may be a password, as written, decoded and encoded, and its pieces."""
    url = str(url)
    found: set[str] = set()
    _, userinfo, _ = _parts(url)
    if userinfo is not None and ":" in userinfo:
        found.add(userinfo.split(":", 1)[1])
    found.update(m.group(2) for m in _QUERY_SECRET.finditer(url))
    out: set[str] = set()
    for secret in found:
        if not secret:
            continue
        for form in (secret, unquote(secret), quote(unquote(secret), safe="")):
            out.add(form)
            out.update(p for p in re.split(r"[@:/?#\[\]]", form) if len(p) >= MIN_PIECE)
    return {s for s in out if s}


def remember(url: str | None) -> None:
    """Note the secrets of ``url`` so that :func:`scrub` removes them from any later message."""
    if url:
        found = secrets_of(url)
        with _lock:
            _remembered.update(found)


def shown_url(url: str) -> str:
    """``url`` fit for a message: ``scheme://user:***@host/db``, ``password=***``; nothing else changed."""
    url = str(url)
    prefix, userinfo, rest = _parts(url)
    if userinfo is not None and ":" in userinfo:
        url = f"{prefix}{userinfo.split(':', 1)[0]}:{MASK}@{rest}"
    return _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, url)


def scrub(text: str, extra_urls: tuple[str, ...] = ()) -> str:
    """``text`` with every remembered secret (and those of ``extra_urls``) replaced by ``***``."""
    with _lock:
        secrets = set(_remembered)
    for url in extra_urls:
        secrets |= secrets_of(url)
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: a piece never leaves a remainder
        if len(secret) >= 3:
            text = text.replace(secret, MASK)
    return text


def check_url(url: str) -> str:
    """``""`` if SQLAlchemy can read ``url`` (scheme, host, a numeric port), else a message naming the
    problem (password masked)."""
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
        _ = u.port  # a non-numeric port fails only here (or later, deep in create_engine)
        u.get_backend_name()
    except ValueError as exc:
        detail = "malformed host or port; a port must be a number" if "int()" in str(exc) else str(exc)
        return f"the registry database URL {shown_url(url)} is not valid ({detail})"
    except Exception as exc:  # sqlalchemy.exc.ArgumentError and the like
        return f"the registry database URL {shown_url(url)} is not valid ({scrub(str(exc), (url,))})"
    return ""


__all__ = ["check_url", "remember", "scrub", "secrets_of", "shown_url"]
