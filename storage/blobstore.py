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

from mmer_cl.errors import MmerError
from mmer_cl.faults import fault_point

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class BlobError(MmerError):
    """A blob is missing or its bytes no longer match its name."""

    exit_code = 1


MARKER_NAME = "mmer-store.json"


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Batch:
    """Blobs created inside one operation; rolled back if the operation fails."""

    store: "BlobStore"
    created: list[str] = field(default_factory=list)

    def put(self, data: bytes) -> str:
        digest = sha256(data)
        existed = self.store._complete(digest, len(data))
        try:
            self.store._put(data, digest)
        except BaseException:  # even when interrupted right after the rename: a new blob is ours to remove
            if not existed:
                self.store.path(digest).unlink(missing_ok=True)
            raise
        if not existed:
            self.created.append(digest)
        return digest


@dataclass(frozen=True)
class GcResult:
    removed: int
    freed_bytes: int
    temp_files: int
    partial_exports: int = 0


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

    def _complete(self, digest: str, size: int) -> bool:
        target = self.path(digest)
        return target.exists() and target.stat().st_size == size

    def _put(self, data: bytes, digest: str | None = None) -> tuple[str, bool]:
        digest = digest or sha256(data)
        target = self.path(digest)
        if self._complete(digest, len(data)):
            return digest, False
        target.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            fault_point("blob.before_rename")
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            fault_point("blob.after_rename")
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

    # ---- the store's identity marker (see mmer_cl.identity) ------------------------------
    def read_marker(self) -> bytes | None:
        """The identity marker at the root of the blob location, or None when there is none."""
        try:
            return (self.objects / MARKER_NAME).read_bytes()
        except FileNotFoundError:
            return None

    def write_marker(self, data: bytes) -> None:
        """Write (atomically, durably) the identity marker at the root of the blob location."""
        target = self.objects / MARKER_NAME
        fd, tmp = tempfile.mkstemp(dir=self.objects, prefix=".tmp-marker-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
            _fsync_dir(self.objects)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def has_blobs(self) -> bool:
        """Whether any blob is stored (cheaper than listing them all)."""
        return next(self.digests(), None) is not None

    def digests(self) -> Iterator[str]:
        """Every stored blob's digest (the marker and temp files are not blobs)."""
        for sub in sorted(self.objects.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    if not f.name.startswith(".") and _DIGEST.match(sub.name + f.name):
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
                fault_point("gc.mid_delete")
        for tmp in [*self.objects.glob("*/.tmp-*"), *self.objects.glob(".tmp-marker-*")]:
            tmp.unlink(missing_ok=True)
            temps += 1
        return GcResult(removed, freed, temps)
