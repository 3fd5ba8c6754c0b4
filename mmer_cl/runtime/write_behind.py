"""Write blobs on a second thread while the next tensor is computed.

A blob's name is its sha256, so :meth:`WriteBehind.put` can return it at
once and leave the write (and its fsync, most of the time a put takes) to
a writer thread. At most ``depth`` blobs wait, so memory stays bounded; an
error in the writer is raised at the next ``put`` or when the block ends,
and leaving the block always waits for the writer, so nothing is written
after a caller's rollback has run.
"""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from mmer_cl.runtime.interrupts import raise_if_interrupted
from storage.blobstore import sha256

Put = Callable[[bytes], str]
_STOP = object()


class WriteBehind:
    """``put`` that hashes here and writes on a background thread."""

    def __init__(self, put: Put, depth: int = 2):
        self._put = put
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mmer-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain without writing once something failed
            data, digest = item
            try:
                written = self._put(data)
                if written != digest:
                    raise RuntimeError(f"blob written as {written}, expected {digest}")
            except BaseException as exc:  # handed to the caller
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, data: bytes) -> str:
        raise_if_interrupted()
        self._raise()
        digest = sha256(data)
        self._queue.put((data, digest))
        return digest

    def wait(self) -> None:
        """Let the writer finish what is queued, then end it."""
        self._queue.put(_STOP)
        self._thread.join()

    def close(self) -> None:
        """Wait for every queued write; raise the writer's error, if any."""
        self.wait()
        self._raise()
        raise_if_interrupted()


@contextmanager
def write_behind(put: Put, depth: int = 2) -> Iterator[Put]:
    """A ``put`` whose writes run behind the caller; every write has finished when the block ends."""
    writer = WriteBehind(put, depth)
    try:
        yield writer.put
    except BaseException:
        writer.wait()  # nothing may land after the caller's rollback
        raise
    writer.close()
