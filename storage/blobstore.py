"""A content-addressed blob store: objects named by the sha256 of their bytes.

The bytes live in a :mod:`storage.backends` backend: a local directory
(``root/objects/ab/cdef...``, the default) or any fsspec filesystem such as
``s3://bucket/prefix``. Writes are atomic (an object appears whole or not at
all under its final name), identical content is stored once, and every read
is verified against its name. :meth:`BlobStore.batch` groups writes so that
a failed operation removes exactly the blobs it created. The store knows
nothing of models or tensors.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from mmer_cl.errors import MmerError
from mmer_cl.runtime.faults import fault_point
from storage.backends import MARKER_NAME, PAGE_SIZE, Backend, BackendError, open_backend  # noqa: F401

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
INTACT, DAMAGED, ABSENT = "intact", "damaged", "absent"


class BlobError(MmerError):
    """A blob is missing or its bytes no longer match its name."""

    exit_code = 1


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Batch:
    """Blobs created inside one operation; rolled back if the operation fails."""

    store: "BlobStore"
    created: list[str] = field(default_factory=list)

    def put(self, data: bytes) -> str:
        digest = sha256(data)
        state = self.store._state(digest, len(data))
        if state == INTACT:
            return digest
        if state == DAMAGED:  # repaired: the object was there before this batch, so it is never ours to remove
            self.store._write(digest, data)
            return digest
        try:
            self.store._write(digest, data)
        except BaseException:  # even when interrupted right after the object appeared: it is ours to remove
            self.store.backend.delete(_key(digest))
            raise
        self.created.append(digest)
        return digest

    def discard(self, keep: Iterable[str] = ()) -> int:
        """Delete the blobs this batch created (none of which any row references yet), except ``keep``;
        for an operation that ends without recording anything ("nothing changed"). Returns how many."""
        kept = set(keep)
        gone = [d for d in self.created if d not in kept]
        for digest in gone:
            self.store.backend.delete(_key(digest))
        self.created = [d for d in self.created if d in kept]
        return len(gone)


@dataclass(frozen=True)
class GcResult:
    removed: int
    freed_bytes: int
    temp_files: int
    partial_exports: int = 0


def _key(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise BlobError(f"{digest!r} is not a sha256 digest")
    return f"{digest[:2]}/{digest[2:]}"


class BlobStore:
    """Blobs under ``root/objects/ab/cdef...``, or on the backend given.

    ``BlobStore(root)`` is the local layout of a store directory;
    :meth:`open` takes a directory or URL of the blob location itself.
    ``create=False`` refuses a location that does not exist.
    """

    def __init__(self, root: str | Path | None = None, *, backend: Backend | None = None, create: bool = True):
        if backend is None:
            if root is None:
                raise ValueError("BlobStore needs a root directory or a backend")
            try:
                backend = open_backend(Path(root) / "objects", create=create)
            except BackendError as exc:
                raise BlobError(str(exc)) from None
        self.backend = backend
        self.location = backend.location

    @classmethod
    def open(cls, location: str | Path, create: bool = False) -> "BlobStore":
        """The blob store at a directory path or URL (``s3://bucket/prefix``, ``file:///dir``, ...)."""
        try:
            return cls(backend=open_backend(location, create=create))
        except BackendError as exc:
            raise BlobError(str(exc)) from None

    @property
    def objects(self) -> Path:
        """The local objects directory; a blob store on a bucket has none (``location`` names any store's)."""
        root = getattr(self.backend, "root", None)
        if not isinstance(root, Path):
            raise AttributeError(f"blob location {self.location} is not a local directory; use .location")
        return root

    def path(self, digest: str) -> Path:
        """The file of a blob (local backend only; tools and tests inspect the layout with it)."""
        key = _key(digest)
        local = getattr(self.backend, "local_path", None)
        if local is None:
            raise BlobError(f"blob location {self.location} is not a local directory")
        return local(key)

    def _state(self, digest: str, size: int) -> str:
        """INTACT (an object of the right size whose bytes hash to its name), DAMAGED (an object of another
        size or content: rewritten by the next put) or ABSENT. The hash costs one read, and only when an
        object of the right size is there already (a write it saves)."""
        try:
            if self.backend.size(_key(digest)) != size:
                return DAMAGED
            return INTACT if sha256(self.backend.get(_key(digest))) == digest else DAMAGED
        except FileNotFoundError:
            return ABSENT

    def _write(self, digest: str, data: bytes) -> None:
        """Write the object whole, replacing whatever (damaged or partial) object is under its name."""
        self.backend.put(_key(digest), data)

    def _put(self, data: bytes) -> tuple[str, bool]:
        digest = sha256(data)
        if self._state(digest, len(data)) == INTACT:
            return digest, False
        self._write(digest, data)
        return digest, True

    def put(self, data: bytes) -> str:
        """Store ``data`` (once) and return its sha256 digest."""
        return self._put(data)[0]

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """Writes inside the block are undone (new blobs deleted) if the block raises."""
        batch = Batch(self)
        try:
            yield batch
        except BaseException:
            for digest in batch.created:
                self.backend.delete(_key(digest))
            raise

    def get(self, digest: str) -> bytes:
        """Read a blob and check that its bytes still hash to its name."""
        try:
            data = self.backend.get(_key(digest))
        except FileNotFoundError:
            raise BlobError(f"blob {digest} is missing from {self.location}; run `mmer audit`") from None
        if sha256(data) != digest:
            raise BlobError(f"blob {digest} is damaged (its content no longer matches its checksum); "
                            "run `mmer audit` to see what it breaks")
        return data

    def exists(self, digest: str) -> bool:
        return self.backend.exists(_key(digest))

    def size(self, digest: str) -> int:
        return self.backend.size(_key(digest))

    def verify(self, digest: str) -> str | None:
        """None when the blob is intact, else why not ('missing' or 'damaged')."""
        try:
            self.get(digest)
        except BlobError as exc:
            return "missing" if "missing" in str(exc) else "damaged"
        return None

    def pages(self, page_size: int = PAGE_SIZE) -> Iterator[list[tuple[str, int]]]:
        """(digest, stored size) of every blob, a bounded page at a time."""
        for page in self.backend.list_pages(page_size):
            out = [(key.replace("/", "", 1), size) for key, size in page]
            yield [(d, s) for d, s in out if _DIGEST.match(d)]

    def has_blobs(self) -> bool:
        """Whether any blob is stored (reads one page at most)."""
        return next(self.digests(), None) is not None

    def digests(self) -> Iterator[str]:
        for page in self.pages():
            for digest, _ in page:
                yield digest

    def gc(self, referenced: Iterable[str], page_size: int = PAGE_SIZE) -> GcResult:
        """Delete every blob not in ``referenced`` and any temp file left by a crash."""
        keep = set(referenced)
        removed = freed = 0
        for page in self.pages(page_size):
            for digest, size in page:
                if digest not in keep:
                    freed += self.backend.delete(_key(digest)) or size
                    removed += 1
                    fault_point("gc.mid_delete")
        return GcResult(removed, freed, self.backend.remove_temps())

    # ---- the marker at the root of the blob location (store identity) -------------------
    def read_marker(self) -> bytes | None:
        """The marker object's bytes, or None when the location has none."""
        return self.backend.read_marker()

    def write_marker(self, data: bytes) -> None:
        """Write (or replace) the marker object, atomically."""
        self.backend.write_marker(data)
