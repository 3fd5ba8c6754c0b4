"""Writing checkpoints the way Hugging Face does, without holding the model.

:class:`ShardedWriter` buffers tensors until a shard is full, writes it, and
at the end names the shards ``model-0000k-of-0000n.safetensors`` with a
``model.safetensors.index.json`` (or a single ``model.safetensors``).
:func:`atomic_directory` builds the output beside its destination and renames
it into place only when complete, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from mmer_cl.checkpoint import INDEX_NAME, SINGLE_NAME
from mmer_cl.errors import MmerError

DEFAULT_SHARD_BYTES = 2 * 1024**3


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardedWriter:
    """Streams tensors into safetensors shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor_bytes(tensor)
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.directory / f".shard-{len(self._shards):05d}.tmp"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write what is buffered, give the shards their final names, write the index."""
        self._flush()
        n = len(self._shards)
        if n == 0:
            raise MmerError("nothing to write: the checkpoint would contain no tensors")
        if n == 1:
            final = self.directory / SINGLE_NAME
            os.replace(self._shards[0][0], final)
            return [final]
        weight_map: dict[str, str] = {}
        files = []
        for i, (tmp, names) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files


@contextmanager
def atomic_directory(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``destination`` only if the block succeeds."""
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        if not overwrite:
            raise MmerError(f"{destination} already exists and is not empty; choose another output "
                            "directory or pass overwrite=True (--force)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        yield tmp
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(destination, old)
            os.replace(tmp, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
