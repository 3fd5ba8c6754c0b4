"""Mask rules and reconstruction, checked against numbers computed by hand."""

import pytest
import torch

from mmer_cl.errors import ConfigError
from mmer_cl.method.masks import compute_masks, consensus_mask, emr_mask, emr_rescale, masked_abs_sums, mmer_mask
from mmer_cl.method.merging import ties
from mmer_cl.method.reconstruct import reconstruct
from mmer_cl.method.task_vector import task_vector

T1 = torch.tensor([1.0, -2.0, 0.5, 0.0])
T2 = torch.tensor([3.0, 1.0, -0.5, 0.0])
T3 = torch.tensor([-1.0, 0.5, -1.5, 0.0])
MERGED = torch.tensor([2.0, -2.0, -1.0, 0.0])  # ties of T1..T3 at density 1


def test_mmer_mask_takes_the_merged_value_where_it_is_closer_than_the_base():
    # t1: |1|>=|1-2|, |-2|>=0, |0.5|<|1.5|, 0>=0
    assert mmer_mask(T1, MERGED).tolist() == [True, True, False, True]
    assert mmer_mask(T2, MERGED).tolist() == [True, False, True, True]
    assert mmer_mask(T3, MERGED).tolist() == [False, False, True, True]


def test_smaller_lambda_keeps_more_and_larger_keeps_less():
    assert mmer_mask(T1, MERGED, lam=2.0).tolist() == [False, True, False, True]
    assert mmer_mask(T1, MERGED, lam=0.25).tolist() == [True, True, True, True]
    with pytest.raises(ConfigError):
        mmer_mask(T1, MERGED, lam=-1)


def test_mmer_mask_with_lambda_one_minimises_the_l1_distance():
    gen = torch.Generator().manual_seed(0)
    tau, merged = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    mask = mmer_mask(tau, merged)
    ours = (tau - mask * merged).abs()
    best = torch.minimum(tau.abs(), (tau - merged).abs())
    assert torch.allclose(ours, best)
    for _ in range(20):
        other = torch.rand(1000, generator=gen) < 0.5
        assert ours.sum() <= (tau - other * merged).abs().sum()


def test_emr_mask_is_sign_agreement_and_rescale_restores_mean_magnitude():
    assert emr_mask(T1, MERGED).tolist() == [True, True, False, False]
    mask = emr_mask(T1, MERGED)
    tau_abs, kept_abs = masked_abs_sums(T1, mask, MERGED)
    assert (tau_abs, kept_abs) == (3.5, 4.0)
    assert emr_rescale(tau_abs, kept_abs) == 0.875
    assert emr_rescale(1.0, 0.0) == 1.0


def test_consensus_keeps_entries_selected_by_at_least_k_models():
    # mmer votes per entry: [2, 1, 2, 3]
    assert consensus_mask([T1, T2, T3], MERGED, k=2).tolist() == [True, False, True, True]
    assert consensus_mask([T1, T2, T3], MERGED, k=3).tolist() == [False, False, False, True]
    masks = compute_masks("consensus", [T1, T2, T3], MERGED, k=2)
    assert len(masks) == 3 and all(torch.equal(m, masks[0]) for m in masks)


def test_compute_masks_rejects_unknown_rules():
    with pytest.raises(ConfigError, match="unknown mask rule"):
        compute_masks("random", [T1], MERGED)


def test_reconstruct_adds_the_masked_merged_vector_to_the_base():
    base = torch.ones(4)
    mask = torch.tensor([True, True, False, True])
    assert reconstruct(base, mask, MERGED).tolist() == [3.0, -1.0, 1.0, 1.0]
    assert reconstruct(base, mask, MERGED, scale=0.5).tolist() == [2.0, 0.0, 1.0, 1.0]
    out = reconstruct(base.to(torch.bfloat16), mask, MERGED)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_mask_single_model_reconstructs_exactly_even_for_large_changes(dtype):
    # Changes as large as the weights flip signs, where a float32 difference of
    # float32 weights would round; the working dtype keeps it exact.
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(64, 64, generator=gen).to(dtype)
    tuned = torch.randn(64, 64, generator=gen).to(dtype)
    tau = task_vector(base, tuned)
    mask = mmer_mask(tau, tau)
    assert bool(mask.all())
    assert torch.equal(reconstruct(base, mask, tau), tuned)
    assert torch.equal(reconstruct(base, mask, ties([tau], density=1.0)), tuned)
