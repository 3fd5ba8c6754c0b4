"""The compiled loops (numba) and the plain numpy/torch paths give the same bits.

Every codec and the fused merge run both ways here (``MMER_JIT=0`` turns the
compiled loops off), on edge cases that trip index arithmetic: empty
tensors, all zeros, all nonzero, ``-0.0``, a nonzero last element, sizes that
are not a multiple of any block.
"""

import numpy as np
import pytest
import torch

from mmer_cl.method import fused
from mmer_cl.method.expansion import masks_in_pieces, ties_from_thresholds
from mmer_cl.method.merging import trim_threshold
from storage import codecs, delta, jit


def both_ways(monkeypatch, fn):
    monkeypatch.setenv("MMER_JIT", "0")
    plain = fn()
    monkeypatch.setenv("MMER_JIT", "1")
    compiled = fn()
    return plain, compiled


def same_bits(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if a.dtype == torch.bool:
        return b.dtype == torch.bool and torch.equal(a, b)
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def tensors(dtype):
    g = torch.Generator().manual_seed(0)
    n = 10_007
    mostly_zero = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    mostly_zero[torch.rand(n, generator=g) < 0.6] = 0
    mostly_zero[:3] = -0.0
    mostly_zero[-1] = 1.5  # a nonzero last element
    return {
        "empty": torch.zeros(0, dtype=dtype),
        "one": torch.ones(1, dtype=dtype),
        "all zero": torch.zeros(n, dtype=dtype),
        "negative zeros": torch.full((n,), -0.0, dtype=dtype),
        "all nonzero": torch.randn(n, generator=g, dtype=torch.float64).to(dtype),
        "mostly zero": mostly_zero,
        "zero last": torch.cat([mostly_zero[:-1], torch.zeros(1, dtype=dtype)]),
    }


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def test_numba_is_installed_so_the_compiled_loops_run():
    assert jit.enabled()


@pytest.mark.parametrize("dtype", DTYPES)
def test_codecs_round_trip_the_same_bytes_both_ways(monkeypatch, dtype):
    for name, t in tensors(dtype).items():
        plain, compiled = both_ways(monkeypatch, lambda: codecs.encode(t))
        assert plain == compiled, name
        back = both_ways(monkeypatch, lambda: codecs.decode(plain))
        assert same_bits(*back), name
        assert same_bits(back[1], torch.where(t == 0, torch.zeros_like(t), t)), name  # -0.0 is stored as zero


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonzero_split_scatter_and_change_coding_agree(monkeypatch, dtype):
    for name, t in tensors(dtype).items():
        split = both_ways(monkeypatch, lambda: codecs.split_nonzero(t))
        assert same_bits(*split), name
        nonzero, values = split[0]
        refill = both_ways(monkeypatch, lambda: codecs.scatter_into(torch.zeros_like(t), nonzero, values))
        assert same_bits(*refill), name
        old = t.clone()
        old[::7] = 2.0
        changed = both_ways(monkeypatch, lambda: delta.changed(t, old))
        assert same_bits(*changed), name
        if t.numel():
            blob = both_ways(monkeypatch, lambda: delta.encode_delta(t, old, "0" * 64, 0))
            assert (blob[0] is None and blob[1] is None) or blob[0][0] == blob[1][0], name


def test_masks_ordered_by_a_context_come_back_the_same_both_ways(monkeypatch):
    g = torch.Generator().manual_seed(1)
    n = 9_001
    masks = [torch.rand(n, generator=g) < p for p in (0.1, 0.5, 0.9, 0.7, 0.3, 0.2, 0.6, 0.8, 0.4)]  # 9: two bytes
    context = torch.rand(n, generator=g) < 0.5
    coded = both_ways(monkeypatch, lambda: delta.code_masks("w", masks, [None] * len(masks), None, ("c" * 64, context)))
    for (member_a, bits_a), (member_b, bits_b), mask in zip(*coded, masks):
        assert member_a == member_b and np.array_equal(bits_a, bits_b)
        back = both_ways(monkeypatch, lambda: delta.full_mask(torch.from_numpy(bits_a.copy()), [n], context))
        assert torch.equal(back[0], mask) and torch.equal(back[1], mask)


@pytest.mark.parametrize("k, alpha, lams, density", [
    (1, 1.0, [1.0], 0.2),
    (3, 1.0, [1.0, 1.0, 1.0], 0.2),
    (3, 0.7, [1.0, 0.8, 1.3], 0.3),
    (6, 1.0, [1.0] * 6, 1.0),  # density 1 keeps everything (threshold -1)
])
def test_the_fused_merge_and_masks_equal_the_torch_path_bit_for_bit(k, alpha, lams, density):
    g = torch.Generator().manual_seed(k)
    n = 3 * 4096 + 5  # not a multiple of the kernel's block
    base = torch.randn(n, generator=g).bfloat16()
    # bf16 fine-tunes: many task-vector magnitudes tie, so the threshold's tie quota matters
    taus = [(base + 0.01 * torch.randn(n, generator=g)).bfloat16().float() - base.float() for _ in range(k)]
    thresholds = [trim_threshold(t, density) for t in taus]
    assert fused.applies(taus, "mmer")
    merged, masks = fused.ties_mmer(taus, thresholds, alpha, lams)
    want = ties_from_thresholds(taus, thresholds, alpha)
    assert same_bits(merged, want)
    assert same_bits(masks, masks_in_pieces("mmer", taus, want, lams, 2))


def test_the_fused_pass_declines_what_it_does_not_compute():
    wide = [torch.zeros(4, dtype=torch.float64)]
    assert not fused.applies(wide, "mmer")  # float64 weights keep the torch path
    assert not fused.applies([torch.zeros(4)], "emr")


def test_bf16_reconstruction_rounds_like_torch_signed_zeros_and_overflow_included(monkeypatch):
    from mmer_cl.method.reconstruct import reconstruct

    g = torch.Generator().manual_seed(3)
    n = 2 * 4096 + 11
    base = torch.randn(n, generator=g).bfloat16()
    base[:4] = torch.tensor([-0.0, 0.0, 3.3e38, -3.3e38]).bfloat16()
    merged = 0.01 * torch.randn(n, generator=g)
    merged[:4] = torch.tensor([1.0, -1.0, 3e38, -3e38])  # the last two overflow to +-inf in bf16
    merged[10:20] = -0.0
    mask = torch.rand(n, generator=g) < 0.7
    mask[:2] = False
    plain, compiled = both_ways(monkeypatch, lambda: reconstruct(base, mask, merged))
    assert same_bits(plain, compiled)
    assert compiled.dtype == torch.bfloat16 and torch.isinf(compiled[2:4]).all()


def test_the_finiteness_check_finds_a_nan_or_inf_anywhere_in_every_float_dtype(monkeypatch):
    from mmer_cl.checkpoints.dtypes import all_finite

    monkeypatch.setenv("MMER_JIT", "1")
    for dtype in DTYPES:
        t = torch.randn(10_000).to(dtype)
        t[7] = torch.finfo(dtype).max  # large but finite
        assert all_finite(t)
        for where in (0, 4095, 4096, 9_999):
            for bad in (float("nan"), float("inf"), float("-inf")):
                u = t.clone()
                u[where] = bad
                assert not all_finite(u), (dtype, where, bad)


def test_masks_coded_against_a_parent_come_back_the_same_both_ways(monkeypatch):
    g = torch.Generator().manual_seed(4)
    n = 9_001
    support = torch.rand(n, generator=g) < 0.2
    parents, masks = [], []
    for p in (0.3, 0.6, 0.9):
        old = torch.rand(n, generator=g) < p
        new = old.clone()
        new[support] = torch.rand(int(support.sum()), generator=g) < p  # changes only inside the support
        parents.append(("p" * 64, old, 1))
        masks.append(new)
    outside = masks[0].clone()
    outside[~support] = ~outside[~support]  # changes outside the support: stored whole
    masks.append(outside)
    parents.append(("q" * 64, masks[0], 1))
    coded = both_ways(monkeypatch, lambda: delta.code_masks("w", masks, parents, ("s" * 64, support)))
    for (member_a, bits_a), (member_b, bits_b) in zip(*coded):
        assert member_a == member_b and np.array_equal(bits_a, bits_b)
    assert ["parent" in m for m, _ in coded[1]] == [True, True, True, False]


def test_sum_of_squares_and_zero_fraction_agree_both_ways(monkeypatch):
    from mmer_cl.method.task_vector import sum_of_squares

    for dtype in DTYPES:
        for name, t in tensors(dtype).items():
            plain, compiled = both_ways(monkeypatch, lambda: sum_of_squares(t))
            assert compiled == pytest.approx(plain, rel=1e-9, abs=1e-12), (dtype, name)
            plain, compiled = both_ways(monkeypatch, lambda: codecs.zero_fraction(t))
            assert plain == compiled, (dtype, name)


def test_suspending_the_compiled_loops_switches_every_thread_to_the_plain_paths(monkeypatch):
    import threading

    monkeypatch.setenv("MMER_JIT", "1")
    seen = []
    with jit.suspended():
        worker = threading.Thread(target=lambda: seen.append(jit.enabled()))
        worker.start()
        worker.join()
        assert not jit.enabled()
    assert seen == [False] and jit.enabled()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reconstruction_from_the_sparse_form_equals_the_dense_one_bit_for_bit(monkeypatch, dtype):
    from mmer_cl.method.reconstruct import SparseMerged, reconstruct, reconstruct_sparse

    g = torch.Generator().manual_seed(5)
    n = 2 * 4096 + 13  # blocks and bytes of bits both end part-way
    base = torch.randn(n, generator=g).to(dtype)
    base[:3] = torch.tensor([-0.0, -0.0, 3.3e38]).to(dtype)  # (stores refuse non-finite weights)
    merged = 0.01 * torch.randn(n, generator=g)
    merged[torch.rand(n, generator=g) < 0.5] = 0.0
    merged[:3] = torch.tensor([-1e-3, 0.0, 3e38])  # -0.0 base under a rejected negative value and a zero; overflow
    merged[-1] = -0.5
    mask = torch.rand(n, generator=g) < 0.7
    mask[0] = False
    nonzero = merged != 0
    sparse = SparseMerged((n,), torch.from_numpy(np.packbits(nonzero.numpy())), merged[nonzero], mask[nonzero])
    dense = reconstruct(base, mask, merged)
    plain, compiled = both_ways(monkeypatch, lambda: reconstruct_sparse(base, sparse))
    assert same_bits(plain, dense) and same_bits(compiled, dense)
    no_mask = SparseMerged((n,), sparse.nonzero_bits, sparse.values)
    assert same_bits(reconstruct_sparse(base, no_mask), reconstruct(base, torch.ones(n, dtype=torch.bool), merged))


def test_a_sparse_form_whose_map_and_values_disagree_is_refused():
    from mmer_cl.method.reconstruct import SparseMerged, reconstruct_sparse

    bits = torch.from_numpy(np.packbits(np.array([1, 0, 1, 1], dtype=np.uint8)))
    with pytest.raises(ValueError, match="disagree"):
        reconstruct_sparse(torch.zeros(4, dtype=torch.bfloat16), SparseMerged((4,), bits, torch.ones(2)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_one_pass_task_vector_and_norms_equal_the_separate_functions(dtype):
    from mmer_cl.method.task_vector import sum_of_squares, task_vector, task_vector_and_squares

    g = torch.Generator().manual_seed(3)
    for n in (1, 4095, 4097, 3 * 4096 + 5):
        base = torch.randn(n, generator=g).to(dtype)
        tuned = (base.float() + 0.001 * torch.randn(n, generator=g)).to(dtype)
        if n > 4:
            base[0], tuned[1], base[2] = 0.0, -0.0, 1e-40  # signed zero, a subnormal (float32 and bf16)
            tuned[3], base[3] = torch.finfo(dtype).max, torch.finfo(dtype).min  # the difference overflows
        tau, tau_sq, base_sq = task_vector_and_squares(base.reshape(1, -1), tuned.reshape(1, -1))
        want = task_vector(base.reshape(1, -1), tuned.reshape(1, -1))
        assert same_bits(tau, want), n
        assert tau_sq == sum_of_squares(want) and base_sq == sum_of_squares(base), n


@pytest.mark.parametrize("k, alpha, lams, density, seed", [
    (1, 1.0, [1.0], 0.2, 0),
    (3, 1.0, [1.0, 1.0, 1.0], 0.2, 12345),
    (3, 0.7, [1.0, 0.8, 1.3], 0.3, 7),
    (4, 1.0, [1.0] * 4, 1.0, 1),  # density 1 keeps everything (threshold -1)
])
def test_the_hash_tie_rule_gives_the_same_bits_compiled_fused_and_plain(monkeypatch, k, alpha, lams, density, seed):
    from mmer_cl.method.merging import with_tie_rule

    g = torch.Generator().manual_seed(k)
    n = 3 * 4096 + 5
    base = torch.randn(n, generator=g).bfloat16()
    taus = [(base + 0.01 * torch.randn(n, generator=g)).bfloat16().float() - base.float() for _ in range(k)]
    taus[0][:50] = 0.0  # a run of zeros
    thresholds = [trim_threshold(t, density) for t in taus]
    ruled = both_ways(monkeypatch, lambda: [with_tie_rule(t, th, "hash", seed) for t, th in zip(taus, thresholds)])
    assert ruled[0] == ruled[1]  # the same cut, numba or numpy
    ruled = ruled[0]
    merged, masks = fused.ties_mmer(taus, ruled, alpha, lams)
    want = ties_from_thresholds(taus, ruled, alpha)
    assert same_bits(merged, want)
    assert same_bits(masks, masks_in_pieces("mmer", taus, want, lams, 2))
    earliest = ties_from_thresholds(taus, thresholds, alpha)
    if density < 1.0:
        assert not same_bits(want, earliest)  # the rule chose other ties


def test_the_hash_tie_rule_trims_piece_by_piece_as_it_trims_the_whole(monkeypatch):
    import mmer_cl.method.expansion as expansion
    from mmer_cl.method.merging import keep_count, trim, with_tie_rule

    g = torch.Generator().manual_seed(9)
    taus = [torch.randint(-4, 5, (53, 41), generator=g).float() / 16 for _ in range(3)]
    ruled = [with_tie_rule(t, trim_threshold(t, 0.4), "hash", 77) for t in taus]
    whole = expansion.ties_from_thresholds(taus, ruled, 1.0)
    monkeypatch.setattr(expansion, "CHUNK", 97)  # pieces that cut through runs of ties
    assert same_bits(expansion.ties_from_thresholds(taus, ruled, 1.0), whole)
    kept = trim(taus[0], 0.4, "hash", 77)
    assert int((kept != 0).sum()) == keep_count(taus[0].numel(), 0.4)


def test_the_fused_pass_compiles_once_whatever_the_number_of_models():
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 5):  # a tuple of k arrays would be a new type, and a new compilation, for every k
        taus = [torch.randn(1000, generator=g) for _ in range(k)]
        fused.ties_mmer(taus, [trim_threshold(t, 0.2) for t in taus], 1.0, [1.0] * k)
    assert len(fused._ties_mmer.signatures()) == 1
