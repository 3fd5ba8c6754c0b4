"""Reconstruction of one model's LLM tensor: ``theta_0 + scale * m * tau_*``."""

from __future__ import annotations

import numpy as np
import torch

from mmer_cl.precision import working_dtype
from storage import jit
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
        _bf16_reconstruct(base.contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16),
                          mask.contiguous().reshape(-1).numpy(), merged.contiguous().reshape(-1).numpy(),
                          out.reshape(-1).view(torch.int16).numpy().view(np.uint16))
        return out
    dt = working_dtype(base.dtype, merged.dtype)
    delta = merged.to(base.device, dt) * mask.to(base.device)
    if scale != 1.0:
        delta = delta * scale
    return (base.to(dt) + delta).to(dtype or base.dtype)
