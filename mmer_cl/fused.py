"""The ties merge and the ``mmer`` masks of one tensor in a single compiled pass.

For every position it trims each task vector by its known threshold, folds
the kept values exactly as :func:`mmer_cl.expansion.ties_from_thresholds`
does (float32 sums in model order, then the disjoint mean) and compares each
task vector with the result (:func:`mmer_cl.masks.mmer_mask`). Same
operations, same order, same rounding: the tests hold it to the same bits
as the torch path, which stays the reference and the fallback (float64
weights, other rules, no numba). Pure math on arrays; no I/O.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mmer_cl.merging import TrimThreshold
from storage import jit
from storage.jit import kernel

_BLOCK = 4096  # positions per step: each model's slice is copied into a small, cache-resident scratch


@kernel
def _ties_mmer(values, cut, ties, alpha, lams, merged, masks) -> None:
    k = len(values)
    n = merged.size
    left = ties.copy()
    scale = alpha[0]
    val = np.empty(_BLOCK, dtype=np.float32)
    word = val.view(np.int32)
    hat = np.empty(_BLOCK, dtype=np.float32)
    pos = np.empty(_BLOCK, dtype=np.float32)
    neg = np.empty(_BLOCK, dtype=np.float32)
    n_pos = np.empty(_BLOCK, dtype=np.int32)
    n_neg = np.empty(_BLOCK, dtype=np.int32)
    out = np.empty(_BLOCK, dtype=np.float32)
    zero = np.float32(0.0)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        width = stop - start
        pos[:] = zero
        neg[:] = zero
        n_pos[:] = 0
        n_neg[:] = 0
        for i in range(k):  # fold the trimmed vectors in model order, as the accumulator sums do
            val[:width] = values[i][start:stop]
            c = np.int32(cut[i])
            for j in range(width):
                hat[j] = val[j] if (word[j] & 0x7FFFFFFF) > c else zero
            if c > 0 and left[i] > 0:  # the earliest ties at the threshold are kept too
                for j in range(width):
                    if left[i] > 0 and np.int64(word[j] & 0x7FFFFFFF) == c:
                        hat[j] = val[j]
                        left[i] -= 1
            for j in range(width):
                h = hat[j]
                pos[j] += max(h, zero)
                neg[j] += min(h, zero)
                n_pos[j] += h > zero
                n_neg[j] += h < zero
        for j in range(width):
            total = pos[j] + neg[j]
            up = pos[j] / np.float32(max(n_pos[j], 1))
            down = neg[j] / np.float32(max(n_neg[j], 1))
            m = up if total > zero else (down if total < zero else zero)
            out[j] = m
        if scale != np.float32(1.0):
            for j in range(width):
                out[j] = scale * out[j]
        merged[start:stop] = out[:width]
        for i in range(k):
            val[:width] = values[i][start:stop]
            lam = lams[i]
            mask = masks[i]
            if lam == np.float32(1.0):
                for j in range(width):
                    mask[start + j] = abs(val[j]) >= abs(val[j] - out[j])
            else:
                for j in range(width):
                    mask[start + j] = abs(val[j]) >= abs(val[j] - out[j]) * lam


def applies(taus: Sequence[torch.Tensor], rule: str) -> bool:
    """Whether :func:`ties_mmer` serves these inputs (else use the torch path)."""
    return (jit.enabled() and rule == "mmer" and bool(taus) and len(taus) < 128
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in taus))


def ties_mmer(taus: Sequence[torch.Tensor], thresholds: Sequence[TrimThreshold], alpha: float,
              lams: Sequence[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The ties merge of float32 CPU ``taus`` trimmed by ``thresholds``, and each one's ``mmer`` mask."""
    shape = taus[0].shape
    flat = [t.detach().contiguous().reshape(-1).numpy() for t in taus]
    merged = np.empty(flat[0].size, dtype=np.float32)
    masks = [np.empty(flat[0].size, dtype=np.bool_) for _ in flat]
    _ties_mmer(tuple(flat), np.array([t.bits for t in thresholds], dtype=np.int64),
               np.array([t.ties for t in thresholds], dtype=np.int64),
               np.array([alpha], dtype=np.float32), np.array(lams, dtype=np.float32), merged, tuple(masks))
    return (torch.from_numpy(merged).reshape(shape), [torch.from_numpy(m).reshape(shape) for m in masks])
