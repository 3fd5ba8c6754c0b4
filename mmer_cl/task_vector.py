"""Task vectors: what fine-tuning changed, ``tau = theta_tuned - theta_base``.

Arithmetic is at least float32 whatever the storage dtype (float64 for float32
weights, so the difference is exact; see :mod:`mmer_cl.precision`), on the
base tensor's device.
"""

from __future__ import annotations

import numpy as np
import torch

from mmer_cl.precision import working_dtype
from storage import jit
from storage.jit import kernel


@kernel
def _squares_f32(values: np.ndarray) -> float:
    total = 0.0
    for i in range(values.size):
        v = np.float64(values[i])
        total += v * v
    return total


@kernel
def _squares_bf16(bits: np.ndarray) -> float:
    wide = np.empty(1, dtype=np.uint32)
    f = wide.view(np.float32)
    total = 0.0
    for i in range(bits.size):
        wide[0] = np.uint32(bits[i]) << np.uint32(16)
        v = np.float64(f[0])
        total += v * v
    return total


def sum_of_squares(t: torch.Tensor) -> float:
    """``sum(t ** 2)`` of a float tensor, accumulated in float64 (a statistic, not part of any merge)."""
    flat = t.detach().reshape(-1)
    if jit.enabled() and flat.device.type == "cpu" and flat.numel():
        if flat.dtype == torch.float32:
            return float(_squares_f32(flat.contiguous().numpy()))
        if flat.dtype == torch.bfloat16:
            return float(_squares_bf16(flat.contiguous().view(torch.int16).numpy().view(np.uint16)))
    return float(flat.double().square().sum())


def task_vector(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """Return ``tuned - base``, exactly, in the working dtype on ``base``'s device."""
    if base.shape != tuned.shape:
        raise ValueError(f"shape mismatch: base {tuple(base.shape)} vs tuned {tuple(tuned.shape)}")
    dt = working_dtype(base.dtype, tuned.dtype)
    return tuned.to(base.device, dt) - base.to(dt)


def apply_delta(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``base + delta`` in the working dtype, cast to ``dtype`` (default: base's dtype)."""
    if base.shape != delta.shape:
        raise ValueError(f"shape mismatch: base {tuple(base.shape)} vs delta {tuple(delta.shape)}")
    dt = working_dtype(base.dtype, delta.dtype)
    out = base.to(dt) + delta.to(base.device, dt)
    return out.to(dtype or base.dtype)
