"""Reconstruction of one model's LLM tensor: ``theta_0 + scale * m * tau_*``."""

from __future__ import annotations

import torch


def reconstruct(base: torch.Tensor, mask: torch.Tensor, merged: torch.Tensor, scale: float = 1.0,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """``theta_0 + scale * mask * tau_*`` in float32, cast to ``dtype`` (default: base's)."""
    if not (base.shape == mask.shape == merged.shape):
        raise ValueError(f"shape mismatch: base {tuple(base.shape)}, mask {tuple(mask.shape)}, "
                         f"merged {tuple(merged.shape)}")
    delta = merged.to(base.device, torch.float32) * mask.to(base.device)
    if scale != 1.0:
        delta = delta * scale
    return (base.to(torch.float32) + delta).to(dtype or base.dtype)
