"""1-bit deltas (BitDelta, training-free): a lossy entry codec, as pure tensor math (no I/O).

Per LLM tensor of an entry, with ``tau = theta - theta_0`` its exact task vector
(float32 for bf16/fp16 weights, float64 for float32 weights; see
:mod:`mmer_cl.method.task_vector`):

* A *matrix* (2 or more dimensions and at least :data:`MIN_ELEMENTS`
  elements) is kept as one sign bit per parameter, ``bit = tau > 0`` (a
  zero difference takes the bit of -1: one bit cannot hold 0), and one
  float32 scale, ``mean(|tau|)``: the sum of ``|tau|`` in float64 (in fixed
  blocks, in position order: the same on every run; see :func:`mean_abs`),
  divided by the element count, rounded once to float32.
* Every other tensor (1-D ones such as norm scales and biases, and tiny
  ones) is kept exactly, as its task vector.

Decoding gives ``tau_hat = +scale`` where the bit is set, ``-scale``
elsewhere, as float32. Reconstruction is ``theta_0 + tau_hat`` computed by the
store's own reconstruction with a full mask (:func:`mmer_cl.method.reconstruct.reconstruct`,
as an MMER export computes ``theta_0 + m * tau_*``): the sum in the working
dtype (:mod:`mmer_cl.method.precision`), cast once to the base's dtype (round to
nearest even), so an export and this function give the same bits. A tensor
the fine-tune left unchanged has scale 0 and reconstructs to the base bit for
bit (``x + -0.0 == x``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mmer_cl.method.reconstruct import reconstruct as reconstruct_full

LOSSLESS = "lossless"
BITDELTA = "bitdelta"
CODECS = (LOSSLESS, BITDELTA)
LOSSY = frozenset({BITDELTA})
MIN_ELEMENTS = 64  # below this a tensor is kept exactly: its bits and scale would cost about as much
SUM_BLOCK = 1 << 20  # elements summed at once for a scale


@dataclass(frozen=True)
class OneBit:
    """One matrix's 1-bit delta: its sign plane (True where ``tau > 0``) and its float32 scale."""

    signs: torch.Tensor  # bool, the tensor's shape
    scale: float  # a float32 value, held as a Python float (exact)


def is_lossy(codec: str) -> bool:
    return codec in LOSSY


def takes_one_bit(shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether a tensor of ``shape`` is coded as 1 bit per parameter (else it is kept exactly)."""
    return len(shape) >= 2 and math.prod(shape) >= MIN_ELEMENTS


def mean_abs(tau: torch.Tensor) -> float:
    """``mean(|tau|)``: summed in float64 in blocks of :data:`SUM_BLOCK` elements (numpy's pairwise sum inside
    a block, the blocks added in position order: the same on every run, and memory bounded by a block),
    divided by the element count, rounded once to float32."""
    flat = tau.detach().reshape(-1)
    if flat.numel() == 0:
        return 0.0
    total = 0.0
    for start in range(0, flat.numel(), SUM_BLOCK):
        block = flat[start:start + SUM_BLOCK].to("cpu", torch.float64).numpy()
        total += float(np.abs(block).sum())
    return float(np.float32(total / flat.numel()))


def encode(tau: torch.Tensor) -> OneBit:
    """The 1-bit form of a task-vector matrix."""
    return OneBit(signs=(tau.detach() > 0).to("cpu"), scale=mean_abs(tau))


def decode(code: OneBit) -> torch.Tensor:
    """``tau_hat``: ``+scale`` where the bit is set, ``-scale`` elsewhere, as float32."""
    scale = torch.tensor(code.scale, dtype=torch.float32)
    return torch.where(code.signs, scale, -scale)


def reconstruct(base: torch.Tensor, code: OneBit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``theta_0 + tau_hat`` in the working dtype, cast to ``dtype`` (default: the base's)."""
    delta = decode(code)
    return reconstruct_full(base, torch.ones_like(delta, dtype=torch.bool), delta, 1.0, dtype)


__all__ = ["BITDELTA", "CODECS", "LOSSLESS", "LOSSY", "MIN_ELEMENTS", "SUM_BLOCK", "OneBit", "decode", "encode", "is_lossy",
           "mean_abs", "reconstruct", "takes_one_bit"]
