"""A content-addressed blob store: files named by the sha256 of their bytes.

Writes are atomic (temp file, fsync, rename), identical content is stored
once, and every read is verified against its name. :meth:`BlobStore.batch`
groups writes so that a failed operation removes exactly the blobs it
created. The store knows nothing of models or tensors.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class BlobError(Exception):
    """A blob is missing or its bytes no longer match its name."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Batch:
    """Blobs created inside one operation; rolled back if the operation fails."""

    store: "BlobStore"
    created: list[str] = field(default_factory=list)

    def put(self, data: bytes) -> str:
        digest, new = self.store._put(data)
        if new:
            self.created.append(digest)
        return digest


@dataclass(frozen=True)
class GcResult:
    removed: int
    freed_bytes: int
    temp_files: int


class BlobStore:
    """Blobs under ``root/objects/ab/cdef...``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise BlobError(f"{digest!r} is not a sha256 digest")
        return self.objects / digest[:2] / digest[2:]

    def _put(self, data: bytes) -> tuple[str, bool]:
        digest = sha256(data)
        target = self.path(digest)
        if target.exists() and target.stat().st_size == len(data):
            return digest, False
        target.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
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
                self.path(digest).unlink(missing_ok=True)
            raise

    def get(self, digest: str) -> bytes:
        """Read a blob and check that its bytes still hash to its name."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobError(f"blob {digest} is missing from {self.objects}; run `mmer audit`") from None
        if sha256(data) != digest:
            raise BlobError(f"blob {digest} is damaged (its content no longer matches its checksum); "
                            "run `mmer audit` to see what it breaks")
        return data

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def verify(self, digest: str) -> str | None:
        """None when the blob is intact, else why not ('missing' or 'damaged')."""
        try:
            self.get(digest)
        except BlobError as exc:
            return "missing" if "missing" in str(exc) else "damaged"
        return None

    def digests(self) -> Iterator[str]:
        for sub in sorted(self.objects.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    if not f.name.startswith("."):
                        yield sub.name + f.name

    def gc(self, referenced: Iterable[str]) -> GcResult:
        """Delete every blob not in ``referenced`` and any temp file left by a crash."""
        keep = set(referenced)
        removed = freed = temps = 0
        for digest in list(self.digests()):
            if digest not in keep:
                p = self.path(digest)
                freed += p.stat().st_size
                p.unlink()
                removed += 1
        for tmp in self.objects.glob("*/.tmp-*"):
            tmp.unlink(missing_ok=True)
            temps += 1
        return GcResult(removed, freed, temps)
