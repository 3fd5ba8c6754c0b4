"""Task vectors: what fine-tuning changed, ``tau = theta_tuned - theta_base``.

Arithmetic is at least float32 whatever the storage dtype (float64 for float32
weights, so the difference is exact; see :mod:`mmer_cl.method.precision`), on the
base tensor's device.
"""

from __future__ import annotations

import numpy as np
import torch

from mmer_cl.method.precision import working_dtype
from storage import jit
from storage.codecs import int_view
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
            return float(_squares_bf16(int_view(flat)))
    return float(flat.double().square().sum())


_BLOCK = 4096


@kernel
def _bf16_difference(tuned: np.ndarray, base: np.ndarray, out: np.ndarray, sums: np.ndarray) -> None:
    """``out = float32(tuned) - float32(base)`` from bf16 bits in one pass, and ``sums`` = (sum tau^2,
    sum base^2) in float64, accumulated in position order as :func:`sum_of_squares` does."""
    wide_t = np.empty(_BLOCK, dtype=np.uint32)
    wide_b = np.empty(_BLOCK, dtype=np.uint32)
    f_t = wide_t.view(np.float32)
    f_b = wide_b.view(np.float32)
    tau_sq = 0.0
    base_sq = 0.0
    for start in range(0, out.size, _BLOCK):
        width = min(_BLOCK, out.size - start)
        for j in range(width):
            wide_t[j] = np.uint32(tuned[start + j]) << np.uint32(16)
            wide_b[j] = np.uint32(base[start + j]) << np.uint32(16)
        for j in range(width):
            out[start + j] = f_t[j] - f_b[j]
        for j in range(width):
            d = np.float64(out[start + j])
            tau_sq += d * d
        for j in range(width):
            v = np.float64(f_b[j])
            base_sq += v * v
    sums[0] = tau_sq
    sums[1] = base_sq


def task_vector_and_squares(base: torch.Tensor, tuned: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """:func:`task_vector`, ``sum_of_squares`` of it and of ``base``: one compiled pass for bf16 weights on
    the CPU (no float32 copies of the inputs), the separate functions otherwise; the same values either way."""
    if (jit.enabled() and base.dtype == tuned.dtype == torch.bfloat16 and base.shape == tuned.shape
            and base.device.type == "cpu" and tuned.device.type == "cpu" and base.numel()):
        out = np.empty(base.numel(), dtype=np.float32)
        sums = np.zeros(2, dtype=np.float64)
        _bf16_difference(int_view(tuned.detach().reshape(-1)), int_view(base.detach().reshape(-1)), out, sums)
        return torch.from_numpy(out).reshape(base.shape), float(sums[0]), float(sums[1])
    tau = task_vector(base, tuned)
    return tau, sum_of_squares(tau), sum_of_squares(base)


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
