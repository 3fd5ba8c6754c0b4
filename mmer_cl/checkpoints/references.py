"""Entries registered by reference: the store keeps where the checkpoint is and what it held, not a copy.

For users who keep their fine-tunes elsewhere anyway, ``register --reference``
stores, instead of the entry's task vector, one small record per LLM tensor:
the checkpoint tensor's name, the sha256 of its bytes and, for a grown
embedding, how many rows line up with the base. Every later read (an
expansion) opens the checkpoint at its registered path, checks each tensor
against its sha256, and computes the task vector again from it and the
(equally checked) base. Exports never read it: they need only the base, the
merged vector, the masks and the modality side, which are stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.errors import MmerError
from mmer_cl.runtime.fingerprint import tensor_digest
from mmer_cl.method.task_vector import task_vector

PREFIX = "ref:"


class ReferenceError(MmerError):
    """A referenced checkpoint (or the base) is gone or no longer holds what was registered."""


@dataclass(frozen=True)
class TensorReference:
    """Where one task vector comes from: a checkpoint tensor and the base tensor, each with its sha256."""

    path: str
    key: str
    sha256: str
    rows: int | None
    base_path: str
    base_key: str
    base_sha256: str

    def spec(self) -> str:
        """A string that names this reference in an expansion plan (where blob digests stand otherwise)."""
        return PREFIX + json.dumps(self.__dict__, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_spec(cls, spec: str) -> "TensorReference":
        return cls(**json.loads(spec[len(PREFIX):]))


def is_reference(spec: str) -> bool:
    return spec.startswith(PREFIX)


def _checked(checkpoints: dict[str, Checkpoint], path: str, key: str, sha256: str, what: str) -> torch.Tensor:
    try:
        ckpt = checkpoints.get(path) or checkpoints.setdefault(path, Checkpoint(path))
        t = ckpt.get(key)
    except MmerError as exc:
        raise ReferenceError(f"the {what} registered by reference at {path} can no longer be read ({exc}). "
                             "Put the original checkpoint back at that path, or register a copy without "
                             "--reference.") from exc
    if tensor_digest(t) != sha256:
        raise ReferenceError(f"tensor {key} of the {what} at {path} changed since it was registered (its sha256 "
                             "differs). Put the original checkpoint back, or register the new one as another entry.")
    return t


def read_task_vector(ref: TensorReference, checkpoints: dict[str, Checkpoint],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The task vector ``ref`` names, every byte checked against its recorded sha256."""
    tuned = _checked(checkpoints, ref.path, ref.key, ref.sha256, "checkpoint")
    base = _checked(checkpoints, ref.base_path, ref.base_key, ref.base_sha256, "base model")
    if ref.rows is not None:
        tuned = tuned[: ref.rows]
    return task_vector(base.to(device), tuned)
