"""One tensor's expansion: merge the task vectors, then compute every model's mask.

Pure tensor math; callers stream tensors through :func:`expand_tensor` one
parameter tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from mmer_cl.method import fused
from mmer_cl.method.accumulators import TiesAccumulator
from mmer_cl.method.masks import compute_masks, masked_abs_sums
from mmer_cl.method.merging import TrimThreshold, merge, trim, trim_part, trim_threshold, with_tie_rule
from mmer_cl.method.params import MergeParams
from mmer_cl.method.precision import as_working


@dataclass
class TensorExpansion:
    """The result for one parameter tensor.

    ``thresholds[i]`` is what trimming kept of model ``i`` (``ties`` only; see
    :class:`mmer_cl.method.merging.TrimThreshold`); ``abs_sums[i]`` is
    ``(sum|tau_i|, sum|m_i * tau_*|)``, the pieces of the EMR rescale, and is
    computed for the ``emr`` rule only (zeros otherwise).
    """

    merged: torch.Tensor
    masks: list[torch.Tensor | None]  # None where only the count kept was asked for (expand_tensor_streamed)
    thresholds: list[TrimThreshold | None]
    abs_sums: list[tuple[float, float]]
    kept: list[int] | None = None  # per model, how many positions its mask keeps (when computed already)


def accumulate(taus: Sequence[torch.Tensor], density: float,
               previous: TiesAccumulator | None = None, tie_rule: str = "hash", seed: int = 0) -> TiesAccumulator:
    """Fold trimmed task vectors into ``previous`` (or into zeros)."""
    acc = previous or TiesAccumulator.zeros(taus[0].shape, taus[0].device, as_working(taus[0]).dtype)
    for tau in taus:
        acc = acc.add(trim(tau, density, tie_rule, seed))
    return acc


CHUNK = 1 << 22  # elements per piece of a large tensor: bounds the temporaries of the math


def _pieces(n: int) -> list[slice]:
    return [slice(start, min(start + CHUNK, n)) for start in range(0, n, CHUNK)]


class _Fold:
    """The sums of :class:`TiesAccumulator`, in place: trimmed vectors folded in one at a time, in order."""

    def __init__(self, like: torch.Tensor, members: int):
        self.pos, self.neg = torch.empty_like(like).zero_(), torch.empty_like(like).zero_()
        self.scratch = torch.empty_like(like)
        counts = torch.int8 if members < 128 else torch.int32  # exact either way; int8 moves a quarter of the bytes
        self.n_pos = torch.empty(like.shape, dtype=counts, device=like.device).zero_()
        self.n_neg = torch.empty_like(self.n_pos).zero_()

    def add(self, hat: torch.Tensor, at: slice = slice(None)) -> None:
        """Fold in ``hat``: the whole trimmed vector, or the flat piece ``at`` of it."""
        scratch = self.scratch[at]
        self.pos[at].add_(torch.clamp(hat, min=0, out=scratch))
        self.neg[at].add_(torch.clamp(hat, max=0, out=scratch))
        self.n_pos[at].add_(hat > 0)
        self.n_neg[at].add_(hat < 0)

    def merged(self, alpha: float) -> torch.Tensor:
        """The disjoint mean on the elected sign, times ``alpha`` (the fold's buffers are used up)."""
        pos, neg = self.pos, self.neg
        total = torch.add(pos, neg, out=self.scratch)
        pos.div_(self.n_pos.clamp_(min=1))
        neg.div_(self.n_neg.clamp_(min=1))
        merged = torch.where(total > 0, pos, torch.where(total < 0, neg, torch.zeros((), dtype=pos.dtype,
                                                                                      device=pos.device)))
        return merged if alpha == 1.0 else alpha * merged


def _fold(hats: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``alpha * tau_m`` of trimmed vectors: the sums of :class:`TiesAccumulator`, in the same order, in place."""
    fold = _Fold(hats[0], len(hats))
    for hat in hats:
        fold.add(hat)
    return fold.merged(alpha)


def ties_from_thresholds(taus: Sequence[torch.Tensor], thresholds: Sequence[TrimThreshold],
                         alpha: float) -> torch.Tensor:
    """The ties merge, trimming each task vector by its known threshold and folding them in order.

    The same sums, in the same order, as :class:`TiesAccumulator` (so the
    same bits), computed piece by piece: the hot loop of every expansion,
    whose temporaries stay a few pieces large whatever the tensor.
    """
    flat = [as_working(t).reshape(-1) for t in taus]
    out = torch.empty_like(flat[0])
    ties_left = [t.ties for t in thresholds]
    for piece in _pieces(out.numel()):
        hats = []
        for i, (tau, threshold) in enumerate(zip(flat, thresholds)):
            hat, used = trim_part(tau[piece], threshold, ties_left[i], piece.start)
            ties_left[i] -= used
            hats.append(hat)
        out[piece] = _fold(hats, alpha)
    return out.reshape(taus[0].shape)


def masks_in_pieces(rule: str, taus: Sequence[torch.Tensor], merged: torch.Tensor, lam, k: int
                    ) -> list[torch.Tensor]:
    """:func:`compute_masks`, piece by piece (every rule is elementwise), into one bool tensor per model."""
    flat = [t.reshape(-1) for t in taus]
    flat_merged = merged.reshape(-1)
    masks = [torch.empty(flat_merged.numel(), dtype=torch.bool, device=flat_merged.device) for _ in taus]
    for piece in _pieces(flat_merged.numel()):
        for out, m in zip(masks, compute_masks(rule, [t[piece] for t in flat], flat_merged[piece], lam=lam, k=k)):
            out[piece] = m
    return [m.reshape(merged.shape) for m in masks]


def expand_tensor_streamed(
    taus: Callable[[], Iterable[torch.Tensor]],
    count: int,
    params: MergeParams,
    tensor_name: str = "",
    thresholds: Sequence[TrimThreshold | None] | None = None,
    lams: Sequence[float] | None = None,
    keep_masks: bool = True,
) -> TensorExpansion:
    """:func:`expand_tensor` (``ties``, elementwise mask rules) holding one task vector at a time, not all.

    ``taus()`` yields the ``count`` task vectors in merge order; it is called twice: once to trim and
    fold them into the merged vector, once to mask each against it. The sums are added in the same
    order as :func:`ties_from_thresholds` adds them, so the bits are the same; the memory is the fold's
    (10 bytes per parameter) and one or two task vectors, whatever ``count``. Without ``keep_masks``
    only each mask's count of kept positions (``kept``) is returned, not the masks.
    """
    if not params.incremental or params.mask_rule not in ("mmer", "emr"):
        raise ValueError("streamed expansion needs the ties method and an elementwise mask rule (mmer, emr)")
    known = list(thresholds) if thresholds is not None else [None] * count
    lams = [params.lam] * count if lams is None else list(lams)
    seed = params.tensor_seed(tensor_name)
    found: list[TrimThreshold] = []
    fold, shape = None, None
    for i, tau in enumerate(taus()):
        threshold = known[i] if known[i] is not None else trim_threshold(tau, params.density)
        found.append(threshold)
        shape = tau.shape
        flat = as_working(tau).reshape(-1)
        fold = fold or _Fold(flat, count)
        ruled = with_tie_rule(tau, threshold, params.tie_rule, seed)
        ties_left = ruled.ties
        for piece in _pieces(flat.numel()):  # trimmed piece by piece: the trim's temporaries stay small
            hat, used = trim_part(flat[piece], ruled, ties_left, piece.start)
            ties_left -= used
            fold.add(hat, piece)
        del tau, flat, hat
    if len(found) != count:
        raise ValueError(f"expected {count} task vectors, got {len(found)}")
    merged = fold.merged(params.alpha).reshape(shape)
    del fold
    masks, kept, abs_sums = [], [], []
    for i, tau in enumerate(taus()):
        mask = masks_in_pieces(params.mask_rule, [tau], merged, [lams[i]], params.k)[0]
        kept.append(int(torch.count_nonzero(mask)))
        abs_sums.append(masked_abs_sums(tau, mask, merged) if params.mask_rule == "emr" else (0.0, 0.0))
        masks.append(mask if keep_masks else None)
        del tau, mask
    return TensorExpansion(merged=merged, masks=masks, thresholds=found, abs_sums=abs_sums, kept=kept)


def expand_tensor(
    taus: Sequence[torch.Tensor],
    params: MergeParams,
    tensor_name: str = "",
    thresholds: Sequence[TrimThreshold | None] | None = None,
    lams: Sequence[float] | None = None,
) -> TensorExpansion:
    """Merge ``taus`` and mask each of them.

    With ``ties``, ``thresholds[i]`` (when given) is model ``i``'s trim of this
    tensor from an earlier expansion at the same density, so only models
    without one are trimmed by selection; the result is the same either way.
    Ties at a threshold are chosen by ``params.tie_rule``, seeded by ``params.tensor_seed(tensor_name)``.
    ``lams`` gives each task vector its own mask lambda (default: ``params.lam`` for all).
    """
    if not taus:
        raise ValueError("expand_tensor needs at least one task vector")
    found: list[TrimThreshold | None] = [None] * len(taus)
    lams = [params.lam] * len(taus) if lams is None else list(lams)
    if params.incremental:
        known = list(thresholds) if thresholds is not None else [None] * len(taus)
        found = [t if t is not None else trim_threshold(tau, params.density) for tau, t in zip(taus, known)]
        seed = params.tensor_seed(tensor_name)  # the tie rule's per-tensor seed
        ruled = [with_tie_rule(tau, t, params.tie_rule, seed) for tau, t in zip(taus, found)]
        if fused.applies(taus, params.mask_rule):
            merged, masks = fused.ties_mmer(taus, ruled, params.alpha, lams)
            return TensorExpansion(merged=merged, masks=masks, thresholds=found, abs_sums=[(0.0, 0.0)] * len(taus))
        merged = ties_from_thresholds(taus, ruled, params.alpha)
    else:
        merged = merge(params.method, taus, density=params.density, alpha=params.alpha,
                       seed=params.tensor_seed(tensor_name), tie_rule=params.tie_rule)
    masks = masks_in_pieces(params.mask_rule, taus, merged, lams, params.k)
    if params.mask_rule == "emr":
        abs_sums = [masked_abs_sums(t, m, merged) for t, m in zip(taus, masks)]
    else:
        abs_sums = [(0.0, 0.0)] * len(taus)
    return TensorExpansion(merged=merged, masks=masks, thresholds=found, abs_sums=abs_sums)
