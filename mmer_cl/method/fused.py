"""The ties merge and the ``mmer`` masks of one tensor in a single compiled pass.

For every position it trims each task vector by its known threshold, folds
the kept values exactly as :func:`mmer_cl.method.expansion.ties_from_thresholds`
does (float32 sums in model order, then the disjoint mean) and compares each
task vector with the result (:func:`mmer_cl.method.masks.mmer_mask`). Same
operations, same order, same rounding: the tests hold it to the same bits
as the torch path, which stays the reference and the fallback (float64
weights, other rules, no numba). Pure math on arrays; no I/O.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mmer_cl.method.merging import TrimThreshold, tie_offset
from storage import jit
from storage.jit import kernel

_BLOCK = 4096  # positions per step: each model's slice is copied into a small, cache-resident scratch


@kernel
def _ties_mmer(values, cut, ties, hashed, offsets, tie_cuts, alpha, lams, merged, masks) -> None:
    k = len(values)
    n = merged.size
    left = ties.copy()
    scale = alpha[0]
    val = np.empty((k, _BLOCK), dtype=np.float32)
    word = val.view(np.int32)
    pos = np.empty(_BLOCK, dtype=np.float32)
    neg = np.empty(_BLOCK, dtype=np.float32)
    n_pos = np.empty(_BLOCK, dtype=np.float32)  # counts as floats: exact below 2**24, and the loops vectorise
    n_neg = np.empty(_BLOCK, dtype=np.float32)
    out = np.empty(_BLOCK, dtype=np.float32)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        width = stop - start
        pos[:width] = zero
        neg[:width] = zero
        n_pos[:width] = zero
        n_neg[:width] = zero
        for i in range(k):  # trim each vector and fold it in, in model order, as the accumulator sums do
            val[i, :width] = values[i][start:stop]
            c = np.int32(cut[i])
            v, w = val[i], word[i]
            if hashed[i]:  # tie rule hash: a tie is kept where its position's hash is at most the cut
                any_tie = c > 0 and ties[i] > 0
                off, top = offsets[i], tie_cuts[i]
                for j in range(width):
                    key = w[j] & 0x7FFFFFFF
                    keep = key > c
                    if key == c and any_tie:
                        h = np.uint64(start + j) + off  # merging.tie_hash, inlined
                        h ^= h >> np.uint64(30)
                        h *= np.uint64(0xBF58476D1CE4E5B9)
                        h ^= h >> np.uint64(27)
                        h *= np.uint64(0x94D049BB133111EB)
                        h ^= h >> np.uint64(31)
                        keep = h <= top
                    y = v[j] if keep else zero
                    pos[j] += max(y, zero)
                    neg[j] += min(y, zero)
                    n_pos[j] += one if y > zero else zero
                    n_neg[j] += one if y < zero else zero
                continue
            ties_end = 0  # tie rule earliest: ties before this position are kept (the earliest ones overall)
            if c > 0 and left[i] > 0:
                ties_end = width
                for j in range(width):
                    if (w[j] & 0x7FFFFFFF) == c:
                        left[i] -= 1
                        if left[i] == 0:
                            ties_end = j + 1
                            break
            for j in range(width):
                key = w[j] & 0x7FFFFFFF
                x = v[j] if key > c or (key == c and j < ties_end) else zero
                pos[j] += max(x, zero)
                neg[j] += min(x, zero)
                n_pos[j] += one if x > zero else zero
                n_neg[j] += one if x < zero else zero
        for j in range(width):  # the disjoint mean on the elected sign
            total = pos[j] + neg[j]
            up = pos[j] / max(n_pos[j], one)
            down = neg[j] / max(n_neg[j], one)
            out[j] = up if total > zero else (down if total < zero else zero)
        if scale != one:
            for j in range(width):
                out[j] = scale * out[j]
        merged[start:stop] = out[:width]
        for i in range(k):  # mmer masks: |tau_i| >= lambda |tau_i - tau_*| (times 1.0 is exact)
            v, lam, mask = val[i], lams[i], masks[i]
            for j in range(width):
                mask[start + j] = abs(v[j]) >= abs(v[j] - out[j]) * lam


def applies(taus: Sequence[torch.Tensor], rule: str) -> bool:
    """Whether :func:`ties_mmer` serves these inputs (else use the torch path)."""
    return (jit.enabled() and rule == "mmer" and bool(taus) and len(taus) < 128
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in taus))


def ties_mmer(taus: Sequence[torch.Tensor], thresholds: Sequence[TrimThreshold], alpha: float,
              lams: Sequence[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The ties merge of float32 CPU ``taus`` trimmed by ``thresholds`` (either tie rule, see
    :class:`mmer_cl.method.merging.TrimThreshold`), and each one's ``mmer`` mask."""
    shape = taus[0].shape
    flat = [t.detach().contiguous().reshape(-1).numpy() for t in taus]
    merged = np.empty(flat[0].size, dtype=np.float32)
    masks = [np.empty(flat[0].size, dtype=np.bool_) for _ in flat]
    _ties_mmer(jit.array_list(flat), np.array([t.bits for t in thresholds], dtype=np.int64),
               np.array([t.ties for t in thresholds], dtype=np.int64),
               np.array([t.seed is not None for t in thresholds], dtype=np.bool_),
               np.array([tie_offset(t.seed or 0) for t in thresholds], dtype=np.uint64),
               np.array([t.cut for t in thresholds], dtype=np.uint64),
               np.array([alpha], dtype=np.float32), np.array(lams, dtype=np.float32), merged,
               jit.array_list(masks))
    return (torch.from_numpy(merged).reshape(shape), [torch.from_numpy(m).reshape(shape) for m in masks])
