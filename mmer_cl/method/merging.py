"""Merges of task vectors into one vector ``tau_*`` (DESIGN.md section 1).

Every merge takes the task vectors of one parameter tensor (one per model,
same shape) and returns a tensor of that shape in their working dtype
(float32 at least; see :mod:`mmer_cl.method.precision`). They are pure
functions: no I/O, no global state; ``dare_ties`` takes an explicit seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from mmer_cl.errors import ConfigError
from mmer_cl.method.precision import as_working, common
from storage import jit
from storage.jit import kernel


def _check(taus: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if not taus:
        raise ConfigError("a merge needs at least one task vector")
    shape = taus[0].shape
    for t in taus:
        if t.shape != shape:
            raise ConfigError(f"task vectors differ in shape: {tuple(shape)} vs {tuple(t.shape)}")
    return common([as_working(t) for t in taus])


def check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")


def keep_count(numel: int, density: float) -> int:
    """How many entries trimming keeps: round(density * numel), at least 1."""
    check_density(density)
    return min(numel, max(1, round(density * numel)))


TIE_RULES = ("hash", "earliest")  # how trimming chooses among magnitudes tied at its threshold


@dataclass(frozen=True)
class TrimThreshold:
    """What trimming one tensor keeps: every entry whose ``|tau|`` is above ``bits`` (the magnitude's
    IEEE bit pattern, which orders like the magnitude) and ``ties`` of the entries that equal it.
    ``bits == -1`` keeps everything.

    Which ties are kept is the tie rule: with ``seed`` None, the first ``ties`` by position (the rule
    ``earliest``, of every version before the rule was recorded); otherwise the ``ties`` tied positions
    ``p`` with the smallest :func:`tie_hash` ``(p, seed)``, which are those whose hash is at most ``cut``
    (the rule ``hash``; :func:`hashed_ties` finds ``cut``). ``bits`` and ``ties`` do not depend on the
    rule: the store keeps just them per entry and tensor, so a later expansion trims an earlier entry
    again with one comparison (and, for ``hash``, one pass over the ties) instead of a selection.
    """

    bits: int
    ties: int
    seed: int | None = None
    cut: int = 0


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def tie_offset(seed: int) -> int:
    """The 64-bit offset a tensor's seed adds to every position before :func:`tie_hash` mixes it."""
    return (int(seed) * _GOLDEN) & _MASK64


def tie_hash(positions: np.ndarray, seed: int) -> np.ndarray:
    """The tie rule ``hash``'s order: splitmix64's finaliser of ``position + tie_offset(seed)`` (uint64).

    A bijection of 64-bit integers, so distinct positions never tie again; the compiled kernels inline
    the same five steps.
    """
    x = positions.astype(np.uint64) + np.uint64(tie_offset(seed))
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


_SORTABLE = {torch.float32: torch.int32, torch.float64: torch.int64}
_DIRECT_SELECT = 1 << 20


def sortable_magnitudes(tau: torch.Tensor) -> torch.Tensor:
    """``|tau|`` as integers that order like the magnitudes (flat; working dtype)."""
    a = as_working(tau).abs().reshape(-1)
    return a.view(_SORTABLE[a.dtype])


def _kth_largest(keys: torch.Tensor, k: int) -> int:
    """The k-th largest of non-negative integer ``keys`` (1-based), by radix selection on 16-bit digits."""
    width = 8 * keys.element_size()
    shift = width - 16
    while True:
        if keys.numel() <= _DIRECT_SELECT or shift < 0:
            return int(torch.topk(keys, k, sorted=True).values[-1])
        digit = (keys >> shift) & 0xFFFF
        hist = torch.bincount(digit, minlength=1 << 16)
        from_top = hist.flip(0).cumsum(0)
        i = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)))
        bin_ = (1 << 16) - 1 - i
        above = int(from_top[i]) - int(hist[bin_])
        keys = keys[digit == bin_]
        k -= above
        shift -= 16


@kernel
def _threshold_of_float32(words: np.ndarray, k: int, out: np.ndarray) -> None:
    """``out = (t, ties)``: the k-th largest of ``words & 0x7FFFFFFF`` and how many equal ones trimming keeps.

    Two passes over the data: a histogram of the top 16 bits of the key
    finds the bin holding the k-th largest, a histogram of the low 15 bits
    of the keys in that bin finds the key itself.
    """
    high = np.zeros(1 << 16, dtype=np.int64)
    for i in range(words.size):
        high[(words[i] & 0x7FFFFFFF) >> 15] += 1
    above = 0
    top = (1 << 16) - 1
    while above + high[top] < k:
        above += high[top]
        top -= 1
    low = np.zeros(1 << 15, dtype=np.int64)
    for i in range(words.size):
        key = words[i] & 0x7FFFFFFF
        if key >> 15 == top:
            low[key & 0x7FFF] += 1
    bottom = (1 << 15) - 1
    while above + low[bottom] < k:
        above += low[bottom]
        bottom -= 1
    out[0] = (top << 15) | bottom
    out[1] = k - above


def trim_threshold(tau: torch.Tensor, density: float) -> TrimThreshold:
    """The threshold that keeps exactly ``keep_count(numel, density)`` entries of ``tau``."""
    n = tau.numel()
    k = keep_count(n, density)
    if k >= n:
        return TrimThreshold(-1, 0)
    if jit.enabled() and as_working(tau).dtype == torch.float32 and tau.device.type == "cpu":
        out = np.zeros(2, dtype=np.int64)
        _threshold_of_float32(as_working(tau).detach().contiguous().reshape(-1).numpy().view(np.int32), k, out)
        return TrimThreshold(int(out[0]), int(out[1]))
    keys = sortable_magnitudes(tau)
    t = _kth_largest(keys, k)
    return TrimThreshold(t, k - int(torch.count_nonzero(keys > t)))


@kernel
def _tie_cut_float32(words: np.ndarray, bits: int, ties: int, offset: np.ndarray, out: np.ndarray) -> None:
    """``out[0]``: the ``ties``-th smallest tie hash among the positions whose ``words & 0x7FFFFFFF`` is ``bits``.

    Two passes: a histogram of the hashes' top 16 bits finds the bin holding it, then that bin's
    hashes are gathered and sorted. The hash is :func:`tie_hash`, inlined.
    """
    off = offset[0]
    c = np.int32(bits)
    high = np.zeros(1 << 16, dtype=np.int64)
    for i in range(words.size):
        if (words[i] & 0x7FFFFFFF) == c:
            x = np.uint64(i) + off
            x ^= x >> np.uint64(30)
            x *= np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(27)
            x *= np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(31)
            high[x >> np.uint64(48)] += 1
    below = 0
    top = 0
    while below + high[top] < ties:
        below += high[top]
        top += 1
    found = np.empty(high[top], dtype=np.uint64)
    m = 0
    want = np.uint64(top)
    for i in range(words.size):
        if (words[i] & 0x7FFFFFFF) == c:
            x = np.uint64(i) + off
            x ^= x >> np.uint64(30)
            x *= np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(27)
            x *= np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(31)
            if x >> np.uint64(48) == want:
                found[m] = x
                m += 1
    found.sort()
    out[0] = found[ties - below - 1]


def hashed_ties(tau: torch.Tensor, threshold: TrimThreshold, seed: int) -> TrimThreshold:
    """``threshold`` under the tie rule ``hash`` with this tensor's ``seed``: the same count of ties kept,
    chosen as the ``ties`` tied positions with the smallest :func:`tie_hash` (``cut`` is the largest kept)."""
    if threshold.bits <= 0 or threshold.ties <= 0:  # nothing tied is kept, or the ties are zeros
        return TrimThreshold(threshold.bits, threshold.ties, seed, 0)
    work = as_working(tau)
    if jit.enabled() and work.dtype == torch.float32 and tau.device.type == "cpu":
        out = np.zeros(1, dtype=np.uint64)
        words = work.detach().contiguous().reshape(-1).numpy().view(np.int32)
        _tie_cut_float32(words, threshold.bits, threshold.ties, np.array([tie_offset(seed)], dtype=np.uint64), out)
        return TrimThreshold(threshold.bits, threshold.ties, seed, int(out[0]))
    tied = (sortable_magnitudes(work) == threshold.bits).nonzero().reshape(-1).cpu().numpy()
    hashes = tie_hash(tied, seed)
    return TrimThreshold(threshold.bits, threshold.ties, seed,
                         int(np.partition(hashes, threshold.ties - 1)[threshold.ties - 1]))


def with_tie_rule(tau: torch.Tensor, threshold: TrimThreshold, tie_rule: str, seed: int) -> TrimThreshold:
    """``threshold`` (rule-free ``bits`` and ``ties``) made ready to trim ``tau`` under ``tie_rule``."""
    if tie_rule == "earliest":
        return TrimThreshold(threshold.bits, threshold.ties)
    if tie_rule == "hash":
        return hashed_ties(tau, threshold, seed)
    raise ConfigError(f"unknown tie rule {tie_rule!r}; choose one of {list(TIE_RULES)}")


def trim_part(part: torch.Tensor, threshold: TrimThreshold, ties_left: int, start: int = 0
              ) -> tuple[torch.Tensor, int]:
    """Trim one contiguous piece, starting at flat position ``start``, of a flat task vector;
    ``ties_left`` ties at the threshold are still to keep.

    Returns the trimmed piece and how many ties it kept, so that a tensor
    trimmed piece by piece, in order, equals :func:`apply_trim` of the whole.
    Dropped negative entries may come out as -0.0, which every later step
    treats as zero.
    """
    part = as_working(part)
    keys = sortable_magnitudes(part)
    keep = keys > threshold.bits
    used = 0
    if ties_left and threshold.bits > 0:  # kept zeros change nothing
        tied = (keys == threshold.bits).nonzero().reshape(-1)
        if threshold.seed is None:  # earliest
            tied = tied[:ties_left]
        else:  # hash: the tied positions whose hash is at most the cut
            hashes = tie_hash(tied.cpu().numpy() + start, threshold.seed)
            tied = tied[torch.from_numpy(hashes <= np.uint64(threshold.cut)).to(tied.device)]
        keep[tied] = True
        used = tied.numel()
    return part.reshape(-1).mul(keep).reshape(part.shape), used


def apply_trim(tau: torch.Tensor, threshold: TrimThreshold) -> torch.Tensor:
    """``tau`` with every entry that ``threshold`` does not keep set to zero (working dtype)."""
    return trim_part(tau, threshold, threshold.ties)[0]


def trim(tau: torch.Tensor, density: float, tie_rule: str = "hash", seed: int = 0) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest ``|tau|``; zero the rest.

    Exactly ``keep_count(numel, density)`` entries are kept; ties at the
    threshold are chosen by ``tie_rule`` (see :class:`TrimThreshold`).
    """
    return apply_trim(tau, with_tie_rule(tau, trim_threshold(tau, density), tie_rule, seed))


def elect_sign(hats: Sequence[torch.Tensor]) -> torch.Tensor:
    """``gamma = sign(sum_i hat_i)``: the sign with the most total mass, per entry."""
    return torch.sign(torch.stack(list(hats)).sum(dim=0))


def disjoint_mean(hats: Sequence[torch.Tensor], gamma: torch.Tensor) -> torch.Tensor:
    """Mean of the entries whose sign agrees with ``gamma`` (zeros not counted)."""
    stacked = torch.stack(list(hats))
    agree = (torch.sign(stacked) == gamma) & (stacked != 0)
    total = (stacked * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def ties(taus: Sequence[torch.Tensor], density: float = 0.2, alpha: float = 1.0, tie_rule: str = "hash",
         seed: int = 0) -> torch.Tensor:
    """TIES merge: trim to ``density`` (ties at the threshold chosen by ``tie_rule`` with ``seed``),
    elect signs, disjoint mean, scale by ``alpha``."""
    hats = [trim(t, density, tie_rule, seed) for t in _check(taus)]
    return alpha * disjoint_mean(hats, elect_sign(hats))


def task_arithmetic(taus: Sequence[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """``alpha * sum_i tau_i``."""
    return alpha * torch.stack(_check(taus)).sum(dim=0)


def average(taus: Sequence[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """``alpha * mean_i tau_i`` (the NaiveMC-style merge)."""
    return alpha * torch.stack(_check(taus)).mean(dim=0)


def dare(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability ``1 - density``; rescale survivors by ``1/density``."""
    check_density(density)
    tau = as_working(tau)
    keep = torch.rand(tau.shape, generator=generator, device=generator.device) < density
    return torch.where(keep.to(tau.device), tau / density, torch.zeros_like(tau))


def dare_ties(
    taus: Sequence[torch.Tensor], density: float = 0.2, alpha: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """DARE (seeded random drop with rescale) for each model, then TIES sign election.

    Model ``i`` draws from a CPU generator seeded with ``seed + i``, so a
    result depends only on the seed, never on the device or call order.
    """
    taus = _check(taus)
    hats = []
    for i, tau in enumerate(taus):
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        hats.append(dare(tau.cpu(), density, gen).to(tau.device))
    return alpha * disjoint_mean(hats, elect_sign(hats))


MergeFn = Callable[..., torch.Tensor]

MERGE_METHODS: dict[str, MergeFn] = {
    "ties": ties,
    "task_arithmetic": task_arithmetic,
    "average": average,
    "dare_ties": dare_ties,
}


def merge(method: str, taus: Sequence[torch.Tensor], *, density: float = 0.2, alpha: float = 1.0,
          seed: int = 0, tie_rule: str = "hash") -> torch.Tensor:
    """Dispatch to a merge by name, passing only the parameters that merge uses."""
    if method == "ties":
        return ties(taus, density=density, alpha=alpha, tie_rule=tie_rule, seed=seed)
    if method == "dare_ties":
        return dare_ties(taus, density=density, alpha=alpha, seed=seed)
    if method in MERGE_METHODS:
        return MERGE_METHODS[method](taus, alpha=alpha)
    raise ConfigError(f"unknown merge method {method!r}; choose one of {sorted(MERGE_METHODS)}")
