"""Task vectors: what fine-tuning changed, ``tau = theta_tuned - theta_base``.

Arithmetic is float32 whatever the storage dtype, on the base tensor's device.
"""

from __future__ import annotations

import torch


def task_vector(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """Return ``tuned - base`` in float32 on ``base``'s device."""
    if base.shape != tuned.shape:
        raise ValueError(f"shape mismatch: base {tuple(base.shape)} vs tuned {tuple(tuned.shape)}")
    return tuned.to(base.device, torch.float32) - base.to(torch.float32)


def apply_delta(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``base + delta`` computed in float32, cast to ``dtype`` (default: base's dtype)."""
    if base.shape != delta.shape:
        raise ValueError(f"shape mismatch: base {tuple(base.shape)} vs delta {tuple(delta.shape)}")
    out = base.to(torch.float32) + delta.to(base.device, torch.float32)
    return out.to(dtype or base.dtype)
