"""Task vectors: what fine-tuning changed, ``tau = theta_tuned - theta_base``.

Arithmetic is at least float32 whatever the storage dtype (float64 for float32
weights, so the difference is exact; see :mod:`mmer_cl.precision`), on the
base tensor's device.
"""

from __future__ import annotations

import torch

from mmer_cl.precision import working_dtype


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
