"""Incremental TIES: per-parameter accumulators that absorb one model at a time.

    S+ = sum_i max(hat_i, 0)    N+ = count_i [hat_i > 0]
    S- = sum_i min(hat_i, 0)    N- = count_i [hat_i < 0]

``gamma = sign(S+ + S-)``; the merged value is ``S+/N+`` where gamma > 0 and
``S-/N-`` where gamma < 0. This equals batch ``ties`` (same trimming), so an
expansion reads only the new model's trimmed vector and the old accumulators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmer_cl.method.precision import as_working

COUNT_DTYPE = torch.int32


@dataclass(frozen=True)
class TiesAccumulator:
    pos_sum: torch.Tensor
    neg_sum: torch.Tensor
    pos_count: torch.Tensor
    neg_count: torch.Tensor

    @classmethod
    def zeros(cls, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> "TiesAccumulator":
        f = torch.zeros(shape, dtype=dtype, device=device)
        c = torch.zeros(shape, dtype=COUNT_DTYPE, device=device)
        return cls(f, f.clone(), c, c.clone())

    def add(self, hat: torch.Tensor) -> "TiesAccumulator":
        """Absorb one model's trimmed task vector; returns a new accumulator."""
        return self._update(hat, +1)

    def remove(self, hat: torch.Tensor) -> "TiesAccumulator":
        """Undo :meth:`add` for the same trimmed vector (sums to float tolerance)."""
        return self._update(hat, -1)

    def _update(self, hat: torch.Tensor, sign: int) -> "TiesAccumulator":
        hat = hat.to(self.pos_sum.device, self.pos_sum.dtype)
        if hat.shape != self.pos_sum.shape:
            raise ValueError(f"shape mismatch: accumulator {tuple(self.pos_sum.shape)} vs {tuple(hat.shape)}")
        return TiesAccumulator(
            self.pos_sum + sign * hat.clamp(min=0),
            self.neg_sum + sign * hat.clamp(max=0),
            self.pos_count + sign * (hat > 0).to(COUNT_DTYPE),
            self.neg_count + sign * (hat < 0).to(COUNT_DTYPE),
        )

    def merged(self, alpha: float = 1.0) -> torch.Tensor:
        """``alpha * tau_m`` from the accumulated sums."""
        gamma = torch.sign(self.pos_sum + self.neg_sum)
        pos = self.pos_sum / self.pos_count.clamp(min=1)
        neg = self.neg_sum / self.neg_count.clamp(min=1)
        out = torch.where(gamma > 0, pos, torch.where(gamma < 0, neg, torch.zeros_like(pos)))
        return alpha * out

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"pos_sum": self.pos_sum, "neg_sum": self.neg_sum,
                "pos_count": self.pos_count, "neg_count": self.neg_count}

    @classmethod
    def from_dict(cls, parts: dict[str, torch.Tensor]) -> "TiesAccumulator":
        return cls(as_working(parts["pos_sum"]), as_working(parts["neg_sum"]),
                   parts["pos_count"].to(COUNT_DTYPE), parts["neg_count"].to(COUNT_DTYPE))
