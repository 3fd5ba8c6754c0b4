"""Blobs in a local (or network-mounted) directory: ``DIR/ab/cdef...``.

Writes go to a temp file in the final directory, are fsynced, renamed over
the final name and the directory is fsynced, so an object appears whole or
not at all, even across a power cut.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

from mmer_cl.runtime.faults import fault_point  # crash points of the reliability suite (no-ops unless MMER_FAULT is set)
from storage.backends import MARKER_NAME, PAGE_SIZE, BackendError, paged

TEMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask: from /proc on Linux (no change, so safe beside the writer threads), else by
    setting it and setting it back."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(target: Path, data: bytes, faults: bool = False) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; blobs follow the umask like any file the user writes
        if faults:
            fault_point("blob.before_rename")
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if faults:
            fault_point("blob.after_rename")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalBackend:
    """Objects as files under ``root`` (created only when ``create`` is true)."""

    def __init__(self, root: Path, create: bool = False):
        self.root = Path(root)
        self.location = str(self.root.absolute())
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise BackendError(f"no blob location at {self.root}: check --store / --objects (MMER_STORE, "
                               "MMER_OBJECTS); only `mmer init` creates one")

    def _path(self, key: str) -> Path:
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(exist_ok=True)
        _atomic_write(target, data, faults=True)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def delete(self, key: str) -> int:
        p = self._path(key)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        return size

    def list_pages(self, page_size: int = PAGE_SIZE) -> Iterator[list[tuple[str, int]]]:
        return paged(self._objects(), page_size)

    def _objects(self) -> Iterator[tuple[str, int]]:
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                if not f.name.startswith("."):
                    yield f"{sub.name}/{f.name}", f.stat().st_size

    def remove_temps(self) -> int:
        n = 0
        for tmp in [*self.root.glob(f"*/{TEMP_PREFIX}*"), *self.root.glob(f"{TEMP_PREFIX}*")]:
            tmp.unlink(missing_ok=True)
            n += 1
        return n

    def read_marker(self) -> bytes | None:
        try:
            return (self.root / MARKER_NAME).read_bytes()
        except FileNotFoundError:
            return None

    def write_marker(self, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.root / MARKER_NAME, data)

    def local_path(self, key: str) -> Path:
        """The file behind ``key`` (tests and tools that inspect the layout use it)."""
        return self._path(key)
