"""Which float type the math runs in.

At least float32, whatever the storage dtype, and float64 for float32 or
float64 weights: the difference of two bf16/fp16 numbers is exact in float32
and the difference of two float32 numbers is exact in float64, so a task
vector loses nothing and ``theta_0 + tau`` gives back ``theta`` bit for bit.
"""

from __future__ import annotations

import torch

WIDE = (torch.float32, torch.float64)


def working_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float32/float64, else float32."""
    return torch.float64 if any(d in WIDE for d in dtypes) else torch.float32


def as_working(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors become float32; float32/float64 tensors are kept as they are."""
    return t if t.dtype in WIDE else t.to(torch.float32)


def common(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All tensors in the widest of their working dtypes."""
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return [t.to(dt) for t in tensors]
