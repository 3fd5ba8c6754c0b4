"""Where blob bytes live: a small interface and its implementations.

A backend stores opaque objects under string keys (``ab/cdef...``, chosen by
:class:`storage.BlobStore`) plus one marker object at the root of the blob
location. It knows nothing of digests, checksums or models: the blob store
on top of it names, verifies and garbage-collects.

- :class:`~storage.backends.local.LocalBackend`: a directory (the default;
  temp file, fsync, rename, fsync of the directory).
- :class:`~storage.backends.fsspec_backend.FsspecBackend`: any fsspec
  filesystem, e.g. ``s3://bucket/prefix`` through s3fs, where one PUT makes
  an object appear whole or not at all under its final key.

:func:`open_backend` picks one from a URL or path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator, Protocol
from urllib.parse import urlsplit, urlunsplit

MARKER_NAME = "mmer-store.json"
PAGE_SIZE = 1000


class BackendError(Exception):
    """The blob location cannot be used; the message says what to do."""


class Backend(Protocol):
    """The operations :class:`storage.BlobStore` needs from a place that holds bytes."""

    location: str  # printable (credentials scrubbed)

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any object there (the blob store decides when to write).

        The object must appear whole or not at all under ``key``."""

    def get(self, key: str) -> bytes:
        """The object's bytes; raises ``FileNotFoundError`` when there is none."""

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> int:
        """Remove the object; the bytes freed (0 when it was not there)."""

    def list_pages(self, page_size: int = PAGE_SIZE) -> Iterator[list[tuple[str, int]]]:
        """Every object key with its size, in pages of at most ``page_size``; the marker is not listed."""

    def remove_temps(self) -> int:
        """Delete leftovers of interrupted writes; how many."""

    def read_marker(self) -> bytes | None: ...

    def write_marker(self, data: bytes) -> None: ...


_USERINFO = re.compile(r"//[^/@\s]*@")


def paged(items: Iterable[tuple[str, int]], page_size: int) -> Iterator[list[tuple[str, int]]]:
    """``items`` in lists of at most ``page_size`` (the listing itself stays a stream)."""
    page: list[tuple[str, int]] = []
    for item in items:
        page.append(item)
        if len(page) >= page_size:
            yield page
            page = []
    if page:
        yield page


def scrub_url(url: str) -> str:
    """``url`` without any ``user:secret@`` part, for messages and logs."""
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:
        return _USERINFO.sub("//", text)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return _USERINFO.sub("//", text)


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


def open_backend(location: str | Path, create: bool = False) -> Backend:
    """A backend for a directory path, a ``file://`` URL, or any fsspec URL (``s3://bucket/prefix``).

    ``create=False`` refuses a location that does not exist yet (a mistyped path must not become an
    empty store); ``mmer init`` passes ``create=True``.
    """
    if is_url(location) and not str(location).startswith("file://"):
        from storage.backends.fsspec_backend import FsspecBackend

        return FsspecBackend(str(location), create=create)
    from storage.backends.local import LocalBackend

    path = str(location)[len("file://"):] if str(location).startswith("file://") else location
    return LocalBackend(Path(path), create=create)


__all__ = ["MARKER_NAME", "PAGE_SIZE", "Backend", "BackendError", "is_url", "open_backend", "scrub_url"]
