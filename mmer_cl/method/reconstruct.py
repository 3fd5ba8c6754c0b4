"""Reconstruction of one model's LLM tensor: ``theta_0 + scale * m * tau_*``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmer_cl.method.precision import working_dtype
from storage import jit
from storage.codecs import int_view
from storage.jit import kernel

_BLOCK = 4096


@kernel
def _bf16_reconstruct(base: np.ndarray, mask: np.ndarray, merged: np.ndarray, out: np.ndarray) -> None:
    """bf16 bits of ``float32(base) + merged * mask``, rounded to nearest even as torch casts (NaN -> 0x7FC0)."""
    wide = np.empty(_BLOCK, dtype=np.uint32)
    f = wide.view(np.float32)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for start in range(0, out.size, _BLOCK):
        stop = min(start + _BLOCK, out.size)
        for j in range(stop - start):
            wide[j] = np.uint32(base[start + j]) << np.uint32(16)
        for j in range(stop - start):
            f[j] = f[j] + merged[start + j] * (one if mask[start + j] else zero)
        for j in range(stop - start):
            w = wide[j]
            rounded = np.uint16((w + np.uint32(0x7FFF) + ((w >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
            nan = (w & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            out[start + j] = np.uint16(0x7FC0) if nan else rounded


@kernel
def _bf16_reconstruct_sparse(base: np.ndarray, nonzero: np.ndarray, values: np.ndarray, mask: np.ndarray,
                             out: np.ndarray) -> None:
    """:func:`_bf16_reconstruct` with ``merged`` as packed nonzero bits (np.packbits order) and the values
    there, and the mask given only there (elsewhere ``merged * mask`` is +0.0 whatever the mask).
    The caller checks that the bits ask for exactly ``values.size`` values."""
    wide = np.empty(_BLOCK, dtype=np.uint32)
    f = wide.view(np.float32)
    add = np.empty(_BLOCK, dtype=np.float32)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    j = 0
    last = values.size - 1
    for start in range(0, out.size, _BLOCK):  # _BLOCK is a multiple of 8: blocks start on a byte of bits
        stop = min(start + _BLOCK, out.size)
        for t in range(stop - start):
            wide[t] = np.uint32(base[start + t]) << np.uint32(16)
            add[t] = zero
        if last >= 0:
            for t in range(stop - start):  # branch-free: about half the bits are set, in no pattern
                i = start + t
                bit = (nonzero[i >> 3] >> (7 - (i & 7))) & 1
                at = min(j, last)
                v = values[at] * (one if mask[at] else zero)
                add[t] = v if bit else zero
                j += bit
        for t in range(stop - start):
            f[t] = f[t] + add[t]
        for t in range(stop - start):
            w = wide[t]
            rounded = np.uint16((w + np.uint32(0x7FFF) + ((w >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
            out[start + t] = np.uint16(0x7FC0) if (w & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded


@dataclass(frozen=True)
class SparseMerged:
    """A merged tensor as the store keeps it: where it is nonzero (packed bits, np.packbits order) and its
    values there in position order; ``mask`` (optional) is a model's mask at those same positions."""

    shape: tuple[int, ...]
    nonzero_bits: torch.Tensor  # uint8
    values: torch.Tensor
    mask: torch.Tensor | None = None  # bool, one per value

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(merged, mask)`` as full tensors (the mask all ones where none was given)."""
        numel = int(np.prod(self.shape)) if self.shape else 1
        where = torch.from_numpy(np.unpackbits(self.nonzero_bits.numpy(), count=numel).view(np.bool_))
        merged = torch.zeros(numel, dtype=self.values.dtype)
        merged[where] = self.values
        mask = torch.ones(numel, dtype=torch.bool)
        if self.mask is not None:
            mask[where] = self.mask
        return merged.reshape(self.shape), mask.reshape(self.shape)


def reconstruct_sparse(base: torch.Tensor, merged: SparseMerged, scale: float = 1.0,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`reconstruct` from the sparse form, with the same bits, without building the dense tensors
    where a compiled pass serves (bf16 models)."""
    if tuple(base.shape) != tuple(merged.shape):
        raise ValueError(f"shape mismatch: base {tuple(base.shape)}, merged {tuple(merged.shape)}")
    values = merged.values
    mask = merged.mask if merged.mask is not None else torch.ones(values.numel(), dtype=torch.bool)
    if int(np.bitwise_count(merged.nonzero_bits.numpy()).sum()) != values.numel():
        raise ValueError(f"the nonzero map and the {values.numel()} values of a sparse tensor disagree")
    if not _fused(base, mask, values, scale, dtype) or mask.numel() != values.numel():
        m, mk = merged.dense()
        return reconstruct(base, mk, m, scale, dtype)
    out = torch.empty(base.shape, dtype=torch.bfloat16)
    _bf16_reconstruct_sparse(int_view(base.reshape(-1)), merged.nonzero_bits.numpy(),
                             values.contiguous().reshape(-1).numpy(), mask.contiguous().reshape(-1).numpy(),
                             int_view(out.reshape(-1)))
    return out


def _fused(base: torch.Tensor, mask: torch.Tensor, merged: torch.Tensor, scale: float,
           dtype: torch.dtype | None) -> bool:
    return (jit.enabled() and scale == 1.0 and base.dtype == torch.bfloat16 and merged.dtype == torch.float32
            and mask.dtype == torch.bool and (dtype or base.dtype) == torch.bfloat16 and base.numel() > 0
            and base.device.type == mask.device.type == merged.device.type == "cpu")


def reconstruct(base: torch.Tensor, mask: torch.Tensor, merged: torch.Tensor, scale: float = 1.0,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """``theta_0 + scale * mask * tau_*`` in the working dtype, cast to ``dtype`` (default: base's)."""
    if not (base.shape == mask.shape == merged.shape):
        raise ValueError(f"shape mismatch: base {tuple(base.shape)}, mask {tuple(mask.shape)}, "
                         f"merged {tuple(merged.shape)}")
    if _fused(base, mask, merged, scale, dtype):  # bf16 models: one compiled pass, the same bits
        out = torch.empty(base.shape, dtype=torch.bfloat16)
        _bf16_reconstruct(int_view(base.reshape(-1)),
                          mask.contiguous().reshape(-1).numpy(), merged.contiguous().reshape(-1).numpy(),
                          int_view(out.reshape(-1)))
        return out
    dt = working_dtype(base.dtype, merged.dtype)
    delta = merged.to(base.device, dt) * mask.to(base.device)
    if scale != 1.0:
        delta = delta * scale
    return (base.to(dt) + delta).to(dtype or base.dtype)
