"""Binary masks that pick, per model, the parameters of ``tau_*`` it needs.

Every rule takes all task vectors of one tensor and the merged vector and
returns one boolean mask per model. Pure functions, no I/O.

* ``mmer`` (default): ``m_i = |tau_i| >= lambda * |tau_i - tau_*|``. With
  lambda = 1 this is the exact per-entry minimiser of
  ``||theta_i - (theta_0 + m * tau_*)||_1`` over binary ``m`` (the rule
  TALL-masks derives too).
* ``emr``: sign agreement ``tau_i * tau_* > 0``, used with a per-model rescale
  ``mean|tau_i| / mean|m_i * tau_*|`` over the whole model (see
  :func:`emr_rescale`; EMR-Merging).
* ``consensus``: keep the entries that at least ``k`` models' ``mmer`` masks
  select; every model gets the same mask.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mmer_cl.errors import ConfigError
from mmer_cl.method.precision import as_working, common

MASK_RULES = ("mmer", "emr", "consensus")


def mmer_mask(tau: torch.Tensor, merged: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """``|tau| >= lam * |tau - merged|``: does taking the merged value bring me closer?"""
    if lam < 0:
        raise ConfigError(f"lambda must be >= 0, got {lam}")
    tau, merged = common([as_working(tau), as_working(merged.to(tau.device))])
    gap = torch.sub(tau, merged).abs_()
    if lam != 1.0:
        gap.mul_(lam)
    return tau.abs() >= gap


def emr_mask(tau: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Sign agreement with the merged vector: ``tau * merged > 0``."""
    tau, merged = common([as_working(tau), as_working(merged.to(tau.device))])
    return tau * merged > 0


def _lams(lam: float | Sequence[float], n: int) -> list[float]:
    """One lambda per model: ``lam`` for all, or one each."""
    if isinstance(lam, (int, float)):
        return [float(lam)] * n
    if len(lam) != n:
        raise ConfigError(f"{len(lam)} lambdas given for {n} models")
    return [float(x) for x in lam]


def consensus_mask(taus: Sequence[torch.Tensor], merged: torch.Tensor, k: int,
                   lam: float | Sequence[float] = 1.0) -> torch.Tensor:
    """Entries that at least ``k`` of the models' ``mmer`` masks select."""
    if k < 1:
        raise ConfigError(f"consensus k must be >= 1, got {k}")
    votes = torch.stack([mmer_mask(t, merged, lm) for t, lm in zip(taus, _lams(lam, len(taus)))]).sum(dim=0)
    return votes >= k


def compute_masks(rule: str, taus: Sequence[torch.Tensor], merged: torch.Tensor, *,
                  lam: float | Sequence[float] = 1.0, k: int = 2) -> list[torch.Tensor]:
    """One boolean mask per task vector, by rule name (``lam``: one for all, or one per model)."""
    if rule == "mmer":
        return [mmer_mask(t, merged, lm) for t, lm in zip(taus, _lams(lam, len(taus)))]
    if rule == "emr":
        return [emr_mask(t, merged) for t in taus]
    if rule == "consensus":
        shared = consensus_mask(taus, merged, k, lam)
        return [shared for _ in taus]
    raise ConfigError(f"unknown mask rule {rule!r}; choose one of {list(MASK_RULES)}")


def masked_abs_sums(tau: torch.Tensor, mask: torch.Tensor, merged: torch.Tensor) -> tuple[float, float]:
    """``(sum|tau|, sum|mask * merged|)`` for one tensor: the pieces of the EMR rescale."""
    tau, merged = common([as_working(tau), as_working(merged.to(tau.device))])
    return float(tau.abs().sum()), float((merged * mask).abs().sum())


def emr_rescale(tau_abs_sum: float, kept_abs_sum: float) -> float:
    """Per-model scale ``sum|tau_i| / sum|m_i * tau_*|`` (1.0 where nothing is kept).

    The means in the EMR formula share one denominator (the model's parameter
    count), so the ratio of sums equals the ratio of means.
    """
    return tau_abs_sum / kept_abs_sum if kept_abs_sum > 0 else 1.0

