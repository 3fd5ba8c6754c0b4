"""Masks computed when they are read, from the entry's task vector and the merged vector.

The ``mmer`` and ``emr`` rules are elementwise functions of one entry's task
vector and the merged vector at the same position (``consensus`` counts every
member's votes, so it is not). Versions written since schema 5 therefore
store no masks for those rules: a reader computes ``m_i`` from the entry's
own task vector blob and the version's merged blob with the same function
(:func:`mmer_cl.method.expansion.masks_in_pieces`) the expansion used, so the bits
are the ones the expansion saw. What a version then costs is its merged
vector alone, and that no longer grows with the number of entries.

Pure functions over tensor sources (callables ``key -> tensor``); the store
supplies the sources.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch

from mmer_cl.method.expansion import masks_in_pieces

TensorSource = Callable[[str], torch.Tensor]
DERIVABLE_RULES = ("mmer", "emr")
DERIVED = "derived"  # a version's details["masks"] when its masks are computed on read


def derivable(mask_rule: str) -> bool:
    """Whether one entry's mask is a function of its own task vector and the merged vector alone."""
    return mask_rule in DERIVABLE_RULES


def masks_derived(version_details: dict) -> bool:
    """Whether a version's masks are computed on read (its details say so) rather than stored."""
    return version_details.get("masks") == DERIVED


def derived_mask_source(task_vector: TensorSource, merged: TensorSource, mask_rule: str, lam: float
                        ) -> TensorSource:
    """Per key, the entry's mask: ``mask_rule`` applied to its task vector and the merged vector."""
    if not derivable(mask_rule):
        raise ValueError(f"the {mask_rule!r} mask rule needs every member's task vector; its masks are stored")

    def read(key: str) -> torch.Tensor:
        return masks_in_pieces(mask_rule, [task_vector(key)], merged(key), [lam], 1)[0]

    return read


def mask_at_nonzero(task_vector: torch.Tensor, nonzero_bits: torch.Tensor, values: torch.Tensor,
                    mask_rule: str, lam: float) -> torch.Tensor:
    """The mask at the merged vector's nonzero positions only (in position order), for the sparse read path.

    Every rule is elementwise, so these are the same bits as the dense mask there; elsewhere
    ``merged * mask`` is zero whatever the mask.
    """
    numel = task_vector.numel()
    where = torch.from_numpy(np.unpackbits(nonzero_bits.numpy(), count=numel).view(np.bool_))
    return masks_in_pieces(mask_rule, [task_vector.reshape(-1)[where]], values.reshape(-1), [lam], 1)[0]


def read_once_for_two(source: TensorSource) -> TensorSource:
    """``source`` for two readers of each key (the reconstruction and the mask): the first read decodes and
    keeps the tensor, the second takes it and drops it. Thread-safe; a key read by only one reader stays
    held until the source is dropped (one tensor)."""
    lock = threading.Lock()
    held: dict[str, torch.Tensor] = {}
    pending: dict[str, threading.Event] = {}

    def read(key: str) -> torch.Tensor:
        with lock:
            if key in held:
                return held.pop(key)
            event = pending.get(key)
            if event is None:
                pending[key] = threading.Event()
        if event is not None:  # the other reader is decoding it: wait and take it
            event.wait()
            with lock:
                if key in held:
                    return held.pop(key)
            return source(key)  # its decode failed: read it ourselves, to raise the same error
        try:
            tensor = source(key)
        except BaseException:
            with lock:
                pending.pop(key).set()
            raise
        with lock:
            for stale in [k for k in held if k != key]:  # readers move tensor by tensor: keep at most one
                del held[stale]
            held[key] = tensor
            pending.pop(key).set()
        return tensor

    return read
