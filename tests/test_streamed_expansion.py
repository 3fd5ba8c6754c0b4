"""A tensor whose task vectors would not fit the memory budget is expanded one task vector at a time.

``MMER_EXPAND_MEMORY`` bounds what an expansion holds of decoded task
vectors; above it, a tensor's task vectors are folded in one by one and read
a second time for the masks. The result is the same bits as holding them
all, so the store writes the same blobs whichever way a tensor went.
"""

from __future__ import annotations

import pytest
import torch

from mmer_cl import MergeParams
from mmer_cl.errors import MmerError
from mmer_cl.method.expansion import expand_tensor, expand_tensor_streamed
from mmer_cl.store.expansion_plan import DEFAULT_MEMORY_BUDGET, memory_budget
from mmer_cl.store import Store


def _taus(n: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    taus = []
    for _ in range(n):
        t = torch.randn(shape, generator=g) * 0.01
        t = t.to(dtype).to(torch.float32) if dtype != torch.float32 else t
        t[torch.rand(shape, generator=g) < 0.3] = 0.0  # bit-identical positions, and ties at zero
        t[torch.rand(shape, generator=g) < 0.2] = 0.005  # many ties at one magnitude
        taus.append(t)
    return taus


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("params", [
    MergeParams(density=0.2),
    MergeParams(density=0.3, tie_rule="earliest", alpha=0.7),
    MergeParams(density=0.5, mask_rule="emr"),
    MergeParams(density=0.2, lam=0.8, seed=3),
], ids=["hash", "earliest-alpha", "emr", "lambda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_the_task_vectors_gives_the_same_merged_vector_masks_and_trims(params, dtype):
    taus = _taus(5, (64, 48), dtype)
    lams = [params.lam, 1.2, params.lam, 0.5, params.lam]
    whole = expand_tensor(taus, params, tensor_name="w", lams=lams)
    calls = []

    def stream():
        calls.append(1)
        return iter(taus)

    streamed = expand_tensor_streamed(stream, len(taus), params, tensor_name="w", lams=lams)
    assert len(calls) == 2, "read once to merge, once to mask"
    assert torch.equal(_bits(whole.merged), _bits(streamed.merged))
    assert [torch.equal(a, b) for a, b in zip(whole.masks, streamed.masks)] == [True] * len(taus)
    assert streamed.kept == [int(m.sum()) for m in whole.masks]
    assert whole.thresholds == streamed.thresholds
    flat = (lambda sums: [x for pair in sums for x in pair])
    assert flat(whole.abs_sums) == pytest.approx(flat(streamed.abs_sums))


def test_known_trims_are_used_and_masks_can_be_left_out():
    params = MergeParams(density=0.25)
    taus = _taus(3, (40, 40), torch.float32, seed=1)
    first = expand_tensor(taus, params, tensor_name="x")
    again = expand_tensor_streamed(lambda: iter(taus), 3, params, tensor_name="x", thresholds=first.thresholds,
                                   keep_masks=False)
    assert torch.equal(first.merged, again.merged)
    assert again.masks == [None, None, None] and again.kept == [int(m.sum()) for m in first.masks]


def test_rules_that_need_every_task_vector_at_once_are_refused():
    with pytest.raises(ValueError, match="elementwise mask rule"):
        expand_tensor_streamed(lambda: iter([]), 2, MergeParams(mask_rule="consensus"))


def test_the_budget_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("MMER_EXPAND_MEMORY", raising=False)
    assert memory_budget() == DEFAULT_MEMORY_BUDGET == 1536 * 2**20
    monkeypatch.setenv("MMER_EXPAND_MEMORY", "512M")
    assert memory_budget() == 512 * 2**20
    monkeypatch.setenv("MMER_EXPAND_MEMORY", "2000000")
    assert memory_budget() == 2_000_000
    for bad in ("lots", "-1G", "0"):
        monkeypatch.setenv("MMER_EXPAND_MEMORY", bad)
        with pytest.raises(MmerError, match="MMER_EXPAND_MEMORY"):
            memory_budget()


@pytest.mark.parametrize("store_masks", [False, True], ids=["derived-masks", "stored-masks"])
def test_a_store_expanded_under_a_tiny_budget_writes_the_same_blobs(family, tmp_path, monkeypatch, store_masks):
    def grow(path, budget):
        if budget:
            monkeypatch.setenv("MMER_EXPAND_MEMORY", budget)
        else:
            monkeypatch.delenv("MMER_EXPAND_MEMORY", raising=False)
        s = Store.init(path, family / "base", actor="ci")
        for name in ("vision", "audio"):
            s.register(family / name, name, name)
        s.expand(MergeParams(density=0.3), store_masks=store_masks)
        s.register(family / "video", "video", "video")
        result = s.expand(store_masks=store_masks)
        return s, result

    roomy, _ = grow(tmp_path / "roomy", None)
    tight, result = grow(tmp_path / "tight", "1K")  # every tensor of more than one member streams
    assert result.incremental
    for number in (1, 2):
        blobs = [sorted((r.role, r.key, r.entry_id, r.digest) for r in s.registry.version_blobs(s.version(number).id))
                 for s in (roomy, tight)]
        assert blobs[0] == blobs[1], f"version {number}"
        assert [m.mask_density for m in roomy.version(number).members] == \
            [m.mask_density for m in tight.version(number).members]
    roomy.close()
    tight.close()


@pytest.mark.parametrize("tie_rule", ["hash", "earliest"])
def test_a_tensor_trimmed_in_many_pieces_folds_to_the_same_bits(monkeypatch, tie_rule):
    """Large tensors are trimmed piece by piece (ties at the threshold counted across pieces)."""
    from mmer_cl.method import expansion

    params = MergeParams(density=0.2, tie_rule=tie_rule)
    taus = _taus(4, (50, 37), torch.float32, seed=7)  # 1850 values: 19 pieces of 100 below
    whole = expand_tensor(taus, params, tensor_name="t")
    monkeypatch.setattr(expansion, "CHUNK", 100)
    streamed = expand_tensor_streamed(lambda: iter(taus), 4, params, tensor_name="t")
    assert torch.equal(_bits(whole.merged), _bits(streamed.merged))
    assert streamed.kept == [int(m.sum()) for m in whole.masks]
