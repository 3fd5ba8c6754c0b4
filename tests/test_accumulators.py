"""Incremental TIES: folding models in one at a time equals the batch merge."""

import pytest
import torch

from mmer_cl.method.accumulators import TiesAccumulator
from mmer_cl.method.expansion import accumulate, expand_tensor
from mmer_cl.method.merging import ties, trim
from mmer_cl.method.masks import mmer_mask
from mmer_cl.method.params import MergeParams


def random_taus(n, shape=(17, 23), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (i + 1) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_incremental_ties_equals_batch_ties(n):
    taus = random_taus(n, seed=n)
    acc = TiesAccumulator.zeros(taus[0].shape)
    for tau in taus:
        acc = acc.add(trim(tau, 0.3))
    assert torch.allclose(acc.merged(alpha=0.7), ties(taus, density=0.3, alpha=0.7), atol=1e-6)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_expand_tensor_with_known_trims_of_earlier_models_equals_a_fresh_expansion(n):
    taus = random_taus(n, seed=10 + n)
    params = MergeParams(density=0.25)
    fresh = expand_tensor(taus, params)
    known = fresh.thresholds[:-1] + [None]  # the newest model is trimmed by selection
    incremental = expand_tensor(taus, params, thresholds=known)
    assert torch.equal(incremental.merged, fresh.merged)
    assert incremental.thresholds == fresh.thresholds
    assert all(torch.equal(a, b) for a, b in zip(incremental.masks, fresh.masks))
    assert torch.allclose(fresh.merged, ties(taus, density=0.25), atol=1e-6)


def test_remove_undoes_add():
    taus = random_taus(3)
    acc = accumulate(taus, 0.5)
    without_last = acc.remove(trim(taus[2], 0.5))
    assert torch.allclose(without_last.merged(), ties(taus[:2], density=0.5), atol=1e-6)
    assert torch.equal(without_last.pos_count, accumulate(taus[:2], 0.5).pos_count)


def test_accumulator_round_trips_through_a_dict_of_tensors():
    acc = accumulate(random_taus(2), 0.5)
    again = TiesAccumulator.from_dict(acc.to_dict())
    assert torch.equal(again.merged(), acc.merged())


def test_large_tensors_merged_piece_by_piece_equal_the_accumulators(monkeypatch):
    import mmer_cl.method.expansion as expansion
    from mmer_cl.method.merging import trim_threshold

    taus = random_taus(3, shape=(50, 41), seed=7)
    for t in taus:
        t[t.abs() < 0.8] = 0.75  # many ties at the threshold, spread over several pieces
    thresholds = [trim_threshold(t, 0.4) for t in taus]
    whole = expansion.ties_from_thresholds(taus, thresholds, 1.0)
    monkeypatch.setattr(expansion, "CHUNK", 97)  # pieces that cut through runs of ties
    pieces = expansion.ties_from_thresholds(taus, thresholds, 1.0)
    acc = TiesAccumulator.zeros(taus[0].shape)
    for t in taus:
        acc = acc.add(trim(t, 0.4))
    assert torch.equal(pieces, whole) and torch.equal(whole, acc.merged())
    masks = expansion.masks_in_pieces("mmer", taus, whole, 0.9, 2)
    assert all(torch.equal(m, mmer_mask(t, whole, 0.9)) for m, t in zip(masks, taus))
