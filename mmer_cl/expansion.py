"""One tensor's expansion: merge the task vectors, then compute every model's mask.

Pure tensor math; callers stream tensors through :func:`expand_tensor` one
parameter tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mmer_cl.accumulators import TiesAccumulator
from mmer_cl.masks import compute_masks, masked_abs_sums
from mmer_cl.merging import merge, trim
from mmer_cl.params import MergeParams
from mmer_cl.precision import as_working


@dataclass
class TensorExpansion:
    """The result for one parameter tensor.

    ``accumulator`` is set for ``ties`` (it is what the next expansion folds
    into); ``abs_sums[i]`` is ``(sum|tau_i|, sum|m_i * tau_*|)``, the pieces of
    the EMR rescale.
    """

    merged: torch.Tensor
    masks: list[torch.Tensor]
    accumulator: TiesAccumulator | None
    abs_sums: list[tuple[float, float]]


def accumulate(taus: Sequence[torch.Tensor], density: float,
               previous: TiesAccumulator | None = None) -> TiesAccumulator:
    """Fold trimmed task vectors into ``previous`` (or into zeros)."""
    acc = previous or TiesAccumulator.zeros(taus[0].shape, taus[0].device, as_working(taus[0]).dtype)
    for tau in taus:
        acc = acc.add(trim(tau, density))
    return acc


def expand_tensor(
    taus: Sequence[torch.Tensor],
    params: MergeParams,
    tensor_name: str = "",
    previous: TiesAccumulator | None = None,
    new_from: int = 0,
    lams: Sequence[float] | None = None,
) -> TensorExpansion:
    """Merge ``taus`` and mask each of them.

    With ``ties``, ``previous`` holds the accumulators of ``taus[:new_from]``
    and only ``taus[new_from:]`` are folded in (an incremental expansion); all
    masks are recomputed since they depend on the new merged vector.
    ``lams`` gives each task vector its own mask lambda (default: ``params.lam`` for all).
    """
    if not taus:
        raise ValueError("expand_tensor needs at least one task vector")
    accumulator = None
    if params.incremental:
        if previous is None:
            new_from = 0
        accumulator = accumulate(taus[new_from:], params.density, previous)
        merged = accumulator.merged(params.alpha)
    else:
        merged = merge(params.method, taus, density=params.density, alpha=params.alpha,
                       seed=params.tensor_seed(tensor_name))
    masks = compute_masks(params.mask_rule, taus, merged, lam=params.lam if lams is None else lams, k=params.k)
    abs_sums = [masked_abs_sums(t, m, merged) for t, m in zip(taus, masks)]
    return TensorExpansion(merged=merged, masks=masks, accumulator=accumulator, abs_sums=abs_sums)
