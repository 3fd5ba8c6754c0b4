"""Merges of task vectors, checked against numbers computed by hand."""

import pytest
import torch

from mmer_cl.errors import ConfigError
from mmer_cl.method.merging import average, dare, dare_ties, keep_count, merge, task_arithmetic, ties, trim
from mmer_cl.method.task_vector import apply_delta, task_vector

T1 = torch.tensor([1.0, -2.0, 0.5, 0.0])
T2 = torch.tensor([3.0, 1.0, -0.5, 0.0])
T3 = torch.tensor([-1.0, 0.5, -1.5, 0.0])


def test_task_vector_is_float32_difference_and_round_trips():
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    tuned = torch.tensor([1.5, 2.0, 2.0], dtype=torch.bfloat16)
    tau = task_vector(base, tuned)
    assert tau.dtype == torch.float32
    assert tau.tolist() == [0.5, 0.0, -1.0]
    assert torch.equal(apply_delta(base, tau), tuned)


def test_float32_weights_get_exact_float64_task_vectors():
    base = torch.tensor([1e-3, -2.5e-5, 0.75], dtype=torch.float32)
    tuned = torch.tensor([-3e-7, 1.1e-3, 0.7500001], dtype=torch.float32)
    tau = task_vector(base, tuned)
    assert tau.dtype == torch.float64
    assert torch.equal(apply_delta(base, tau), tuned)


def test_task_vector_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        task_vector(torch.zeros(3), torch.zeros(4))


def test_trim_keeps_the_largest_magnitudes():
    tau = torch.tensor([0.5, -0.1, 0.3, -0.8, 0.05])
    assert torch.equal(trim(tau, 0.4), torch.tensor([0.5, 0.0, 0.0, -0.8, 0.0]))
    assert torch.equal(trim(tau, 1.0), tau)


def test_keep_count_rounds_and_keeps_at_least_one():
    assert keep_count(10, 0.2) == 2
    assert keep_count(10, 0.01) == 1
    assert keep_count(7, 1.0) == 7
    with pytest.raises(ConfigError):
        keep_count(10, 0.0)


def test_ties_without_trimming_is_the_disjoint_mean_of_the_elected_sign():
    # sums [3, -0.5, -1.5, 0] -> signs [+, -, -, 0]
    # entry 0: mean(1, 3) = 2; entry 1: only -2 agrees; entry 2: mean(-0.5, -1.5) = -1
    assert ties([T1, T2, T3], density=1.0).tolist() == [2.0, -2.0, -1.0, 0.0]
    assert ties([T1, T2, T3], density=1.0, alpha=0.5).tolist() == [1.0, -1.0, -0.5, 0.0]


def test_ties_trims_before_electing():
    # density 0.5 keeps 2 of 4: hat1 [1,-2,0,0], hat2 [3,1,0,0], hat3 [-1,0,-1.5,0]
    # sums [3,-1,-1.5,0]: entry 0 mean(1,3)=2, entry 1 -2, entry 2 -1.5
    assert ties([T1, T2, T3], density=0.5).tolist() == [2.0, -2.0, -1.5, 0.0]


def test_task_arithmetic_and_average():
    assert task_arithmetic([T1, T2, T3], alpha=0.5).tolist() == [1.5, -0.25, -0.75, 0.0]
    assert torch.allclose(average([T1, T2, T3]), torch.tensor([1.0, -0.5 / 3, -0.5, 0.0]))


def test_ties_of_one_model_at_full_density_is_that_model():
    tau = torch.randn(5, 7)
    assert torch.equal(ties([tau], density=1.0), tau)


def test_dare_keeps_survivors_rescaled_and_drops_the_rest():
    tau = torch.randn(200, 50)
    out = dare(tau, 0.25, torch.Generator().manual_seed(3))
    kept = out != 0
    assert torch.allclose(out[kept], tau[kept] / 0.25)
    assert abs(kept.float().mean().item() - 0.25) < 0.02


def test_dare_ties_is_seeded_and_reduces_to_ties_at_full_density():
    taus = [torch.randn(30, 30) for _ in range(3)]
    assert torch.equal(dare_ties(taus, density=0.3, seed=7), dare_ties(taus, density=0.3, seed=7))
    assert not torch.equal(dare_ties(taus, density=0.3, seed=7), dare_ties(taus, density=0.3, seed=8))
    assert torch.allclose(dare_ties(taus, density=1.0), ties(taus, density=1.0))


def test_merge_dispatches_by_name_and_rejects_unknown_methods():
    assert merge("average", [T1, T2, T3]).tolist() == average([T1, T2, T3]).tolist()
    assert merge("ties", [T1, T2, T3], density=0.5).tolist() == [2.0, -2.0, -1.5, 0.0]
    with pytest.raises(ConfigError, match="unknown merge method"):
        merge("magic", [T1])


def test_merges_reject_mismatched_shapes_and_empty_input():
    with pytest.raises(ConfigError, match="differ in shape"):
        ties([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ConfigError, match="at least one"):
        average([])


def test_the_hash_tie_rule_keeps_the_count_and_spreads_ties_over_the_tensor():
    from mmer_cl.method.merging import keep_count

    tau = torch.full((200, 50), 0.25)  # every magnitude ties at the threshold
    tau[7, 3] = 1.0
    n, want = tau.numel(), keep_count(tau.numel(), 0.2)
    earliest = trim(tau, 0.2, "earliest")
    hashed = trim(tau, 0.2, "hash", seed=11)
    assert int((earliest != 0).sum()) == want == int((hashed != 0).sum())
    assert hashed[7, 3] == 1.0 and earliest[7, 3] == 1.0  # above the threshold: always kept
    first_rows = (earliest != 0).reshape(-1)[: n // 2].sum().item()
    assert first_rows == want  # earliest: the ties all come from the first rows
    halves = (hashed != 0).reshape(-1).reshape(2, -1).sum(dim=1).tolist()
    assert abs(halves[0] - halves[1]) < 0.1 * want  # hash: spread over the whole tensor
    assert torch.equal(hashed, trim(tau, 0.2, "hash", seed=11))  # deterministic
    assert not torch.equal(hashed, trim(tau, 0.2, "hash", seed=12))  # and seeded


def test_the_hash_tie_rule_keeps_the_ties_with_the_smallest_hashes():
    import numpy as np

    from mmer_cl.method.merging import tie_hash

    g = torch.Generator().manual_seed(3)
    tau = torch.randint(-3, 4, (997,), generator=g).float() / 8  # few distinct magnitudes: many ties
    kept = trim(tau, 0.3, "hash", seed=5)
    threshold = kept[kept != 0].abs().min()
    tied = (tau.abs() == threshold).nonzero().reshape(-1).numpy()
    hashes = tie_hash(tied, 5)
    chosen = set(tied[np.argsort(hashes)[: int((kept.abs() == threshold).sum())]].tolist())
    assert chosen == set((kept.abs() == threshold).nonzero().reshape(-1).tolist())
    assert len(set(tie_hash(np.arange(100_000), 5).tolist())) == 100_000  # a bijection: hashes never tie


def test_an_unknown_tie_rule_is_refused():
    with pytest.raises(ConfigError, match="tie rule"):
        trim(T1, 0.5, "latest")


def test_new_versions_record_the_hash_tie_rule_and_older_records_read_as_earliest():
    from mmer_cl.method.params import MergeParams
    from mmer_cl.store.recipe import parse_recipe

    assert MergeParams().tie_rule == "hash"
    assert MergeParams().to_dict()["tie_rule"] == "hash"
    old = {k: v for k, v in MergeParams().to_dict().items() if k != "tie_rule"}  # recorded before the rule
    assert MergeParams.from_dict(old).tie_rule == "earliest"
    assert MergeParams.from_dict(MergeParams().to_dict()) == MergeParams()
    assert MergeParams.from_dict(old).merge_key() != MergeParams().merge_key()  # no incremental step across rules
    assert parse_recipe("tie_rule: earliest\n").params.tie_rule == "earliest"
    with pytest.raises(ConfigError, match="tie rule"):
        MergeParams(tie_rule="first")
