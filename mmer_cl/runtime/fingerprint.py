"""Content digests of tensors and checkpoints (sha256), for dedup and change detection."""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (its dtype and shape are hashed separately)."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def checkpoint_fingerprint(parts: Iterable[tuple[str, tuple[int, ...], str, str]]) -> str:
    """sha256 over (name, shape, dtype, content digest) of every tensor, sorted by name.

    Sorting makes the fingerprint independent of how the checkpoint is sharded.
    """
    h = hashlib.sha256()
    for name, shape, dtype, digest in sorted(parts):
        h.update(f"{name}|{list(shape)}|{dtype}|{digest}\n".encode())
    return h.hexdigest()
