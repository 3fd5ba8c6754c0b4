"""Reconstruction of one model's LLM tensor: ``theta_0 + scale * m * tau_*``."""

from __future__ import annotations

import torch

from mmer_cl.precision import working_dtype


def reconstruct(base: torch.Tensor, mask: torch.Tensor, merged: torch.Tensor, scale: float = 1.0,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """``theta_0 + scale * mask * tau_*`` in the working dtype, cast to ``dtype`` (default: base's)."""
    if not (base.shape == mask.shape == merged.shape):
        raise ValueError(f"shape mismatch: base {tuple(base.shape)}, mask {tuple(mask.shape)}, "
                         f"merged {tuple(merged.shape)}")
    dt = working_dtype(base.dtype, merged.dtype)
    delta = merged.to(base.device, dt) * mask.to(base.device)
    if scale != 1.0:
        delta = delta * scale
    return (base.to(dt) + delta).to(dtype or base.dtype)
