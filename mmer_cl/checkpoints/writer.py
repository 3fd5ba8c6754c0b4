"""Writing checkpoints the way Hugging Face does, one tensor at a time.

Every tensor's name, shape and dtype is known before export (from the key
map), so :class:`ShardedWriter` plans the shards up front, writes each
shard's safetensors header first and then streams tensor bytes into it:
memory never holds more than the tensor being written. Shards are named
``model-0000k-of-0000n.safetensors`` with a ``model.safetensors.index.json``
(or a single ``model.safetensors``), as ``save_pretrained`` names them.
:func:`atomic_directory` builds the output beside its destination and renames
it into place only when complete, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import torch

from mmer_cl.checkpoints.checkpoint import INDEX_NAME, SINGLE_NAME
from mmer_cl.checkpoints.dtypes import CODES, ITEM_BYTES
from mmer_cl.errors import MmerError
from mmer_cl.checkpoints.export_guard import (MARKER_NAME, PARTIAL_SUFFIX, Protected, check_target, marker_bytes,
                                              remove_leftovers)
from mmer_cl.runtime.faults import fault_point

DEFAULT_SHARD_BYTES = 5 * 1024**3


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that renames and new files inside it survive a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, shape and safetensors dtype code (``F32``, ``BF16``, ``BOOL`` ...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = ITEM_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Cut ``specs`` (in order) into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own).

    Hand-written: huggingface_hub's ``split_torch_state_dict_into_shards`` needs the tensors (this plans
    before any exists) and moves an oversized tensor ahead of the shard it interrupts, an order the
    streaming writer, which writes tensors as they arrive, cannot follow.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors header; ``metadata`` (str -> str, e.g. provenance) joins ``{"format": "pt"}``."""
    header: dict = {"__metadata__": {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes the planned tensors, in plan order, straight into their shard files."""

    def __init__(self, directory: str | Path, specs: Sequence[TensorSpec],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, groups: Sequence[Sequence[str]] | None = None,
                 metadata: dict[str, str] | None = None):
        """``groups`` (names per shard) reproduces a known layout; otherwise shards are cut by size.
        ``metadata`` goes into every shard's ``__metadata__``."""
        self.metadata = metadata
        if not specs:
            raise MmerError("nothing to write: the checkpoint would contain no tensors")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if groups is not None:
            by_name = {s.name: s for s in specs}
            self.shards = [[by_name[n] for n in g] for g in groups]
            if sorted(s.name for sh in self.shards for s in sh) != sorted(by_name):
                raise MmerError("the shard groups do not cover the planned tensors exactly once")
        else:
            self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.files = [self.directory / (SINGLE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors")
                      for i in range(1, n + 1)]
        self._queue = [(shard_i, spec) for shard_i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._open_shard = -1
        self._fh: BinaryIO | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise MmerError(f"tensor {name} was not planned for this checkpoint")
        shard_i, spec = self._queue[self._next]
        if name != spec.name:
            raise MmerError(f"tensors out of order: expected {spec.name}, got {name}")
        got = CODES.get(tensor.dtype)
        if tuple(tensor.shape) != spec.shape or got != spec.dtype:
            raise MmerError(f"tensor {name} is {got}{list(tensor.shape)}, planned as {spec.dtype}{list(spec.shape)}")
        if shard_i != self._open_shard:
            self._close_shard()
            self._fh = open(self.files[shard_i], "wb")
            self._fh.write(_header(self.shards[shard_i], self.metadata))
            self._open_shard = shard_i
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._next += 1
        fault_point("export.mid_shard")

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def finish(self) -> list[Path]:
        """Close the last shard and write the index; every planned tensor must have been added."""
        if self._next != len(self._queue):
            missing = self._queue[self._next][1].name
            raise MmerError(f"checkpoint incomplete: tensor {missing} and after were never written")
        self._close_shard()
        if len(self.files) > 1:
            weight_map = {spec.name: f.name for f, shard in zip(self.files, self.shards) for spec in shard}
            total = sum(spec.nbytes for shard in self.shards for spec in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return self.files

    def abort(self) -> None:
        self._close_shard()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
try:
    _renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
except OSError:  # pragma: no cover - no C library to ask
    _renameat2 = None


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux ``renameat2``); False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree_files(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [*(p for p in directory.rglob("*") if p.is_dir()), directory]:
        fsync_dir(d)


@contextmanager
def atomic_directory(destination: str | Path, overwrite: bool = False, marker: bytes | None = None,
                     protected: Sequence[Protected] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``destination`` only if the block succeeds.

    The rules of :mod:`mmer_cl.checkpoints.export_guard` apply: ``overwrite`` replaces only an earlier mmer export,
    never ``protected`` paths; leftovers of a crashed export to the same target are removed first. The
    directory carries ``marker`` (default: a marker without store fields) from its first moment, gets
    normal permissions (0777 & ~umask for directories; files follow the umask) and is fsynced, renamed
    into place atomically, and its parent directory fsynced.
    """
    destination = Path(os.path.abspath(os.fspath(destination)))
    remove_leftovers(destination)
    check_target(destination, overwrite, protected)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=PARTIAL_SUFFIX, dir=destination.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        (tmp / MARKER_NAME).write_bytes(marker or marker_bytes())
        yield tmp
        _fsync_tree_files(tmp)
        fault_point("export.before_rename")
        if destination.exists():
            check_target(destination, overwrite, protected)  # still empty or an mmer export?
            if not exchange(tmp, destination):
                aside = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=PARTIAL_SUFFIX,
                                              dir=destination.parent))
                os.replace(destination, aside)  # marked (or empty): a crash here leaves a removable leftover
                os.replace(tmp, destination)
                tmp = aside
            shutil.rmtree(tmp, ignore_errors=True)  # the replaced export
        else:
            os.replace(tmp, destination)
        fsync_dir(destination.parent)
        fault_point("export.after_rename")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
