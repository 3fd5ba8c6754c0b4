"""Masks of the ``mmer`` and ``emr`` rules are computed when read, not stored.

Each is an elementwise function of one entry's task vector and the merged
vector, so a version stores only its merged vector: exports, loads and
compositions read the same bits as from stored masks, and a version's cost
stops growing with the number of entries. Entries registered by reference
and the ``consensus`` rule keep stored masks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import builders
from mmer_cl import MergeParams
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.store.derived_masks import mask_at_nonzero, read_once_for_two
from mmer_cl.method.expansion import masks_in_pieces
from mmer_cl.store import Store


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {k: ckpt.get(k) for k in ckpt.names()}


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def _store(path: Path, family: Path, params: MergeParams, store_masks: bool) -> Store:
    s = Store.init(path, family / "base", actor="ci")
    for name in ("vision", "audio", "video"):
        s.register(family / name, name, name)
    s.expand(params, store_masks=store_masks)
    return s


@pytest.mark.parametrize("params", [
    MergeParams(density=0.3),
    MergeParams(density=0.5, lam=0.7, lam_per_entry={"audio": 1.3}),
    MergeParams(density=0.4, mask_rule="emr"),
    MergeParams(method="task_arithmetic", alpha=0.6),
], ids=["mmer", "per-entry-lambda", "emr", "task-arithmetic"])
def test_a_derived_mask_exports_the_same_bits_as_a_stored_one(family, tmp_path, params):
    derived = _store(tmp_path / "derived", family, params, store_masks=False)
    stored = _store(tmp_path / "stored", family, params, store_masks=True)
    assert not derived.registry.version_blobs(derived.version().id, "mask"), "no mask blobs written"
    assert stored.registry.version_blobs(stored.version().id, "mask")
    assert derived.version().details["masks"] == "derived"
    for name in ("vision", "audio", "video"):
        _same_bits(_tensors(derived.export(name, tmp_path / f"d-{name}")),
                   _tensors(stored.export(name, tmp_path / f"s-{name}")))
        assert derived.version().member(name).mask_density == stored.version().member(name).mask_density
        assert derived.version().member(name).scale == stored.version().member(name).scale
    derived.close()
    stored.close()


def test_the_consensus_rule_keeps_stored_masks(family, tmp_path):
    s = _store(tmp_path / "s", family, MergeParams(density=0.5, mask_rule="consensus", k=2), store_masks=False)
    assert s.registry.version_blobs(s.version().id, "mask")
    assert s.version().details["masks"] == "stored"
    s.close()


def test_an_entry_registered_by_reference_keeps_stored_masks_so_it_exports_without_its_source(family, tmp_path):
    import shutil
    shutil.copytree(family / "audio", tmp_path / "audio")
    s = Store.init(tmp_path / "s", family / "base", actor="ci")
    s.register(family / "vision", "vision", "vision")
    s.register(tmp_path / "audio", "audio", "audio", reference=True)
    s.expand(MergeParams(density=0.5))
    audio_id = s.version().member("audio").entry_id
    owners = {r.entry_id for r in s.registry.version_blobs(s.version().id, "mask")}
    assert owners == {audio_id}, "only the referenced entry's masks are stored"
    before = _tensors(s.export("audio", tmp_path / "before"))
    shutil.rmtree(tmp_path / "audio")
    _same_bits(before, _tensors(s.export("audio", tmp_path / "after")))
    s.close()


def test_versions_before_and_after_the_change_both_export_as_recorded(family, tmp_path):
    """A store whose first version stored masks (as releases before 0.3 wrote) gains a derived version."""
    s = Store.init(tmp_path / "s", family / "base", actor="ci")
    s.register(family / "vision", "vision", "vision")
    s.register(family / "audio", "audio", "audio")
    s.expand(MergeParams(density=0.5), store_masks=True)
    first = _tensors(s.export("vision", tmp_path / "v1"))
    s.register(family / "video", "video", "video")
    s.expand()
    assert s.version().details["masks"] == "derived"
    _same_bits(first, _tensors(s.export("vision", tmp_path / "v1-again", version=1)))
    reference = _store(tmp_path / "ref", family, MergeParams(density=0.5), store_masks=True)
    _same_bits(_tensors(reference.export("vision", tmp_path / "ref-v")),
               _tensors(s.export("vision", tmp_path / "v2")))
    assert s.audit().ok
    reference.close()
    s.close()


def test_the_composed_model_reads_derived_masks_like_stored_ones(family, tmp_path):
    derived = _store(tmp_path / "derived", family, MergeParams(density=0.5), store_masks=False)
    stored = _store(tmp_path / "stored", family, MergeParams(density=0.5), store_masks=True)
    inp = builders.llava_inputs(seed=4)
    a_model, b_model = derived.compose(), stored.compose()
    with torch.no_grad():
        for name in ("vision", "audio"):
            kw = {"input_ids": inp["input_ids"], "inputs": {name: {"pixel_values": inp["pixel_values"]}}}
            assert torch.equal(a_model(**kw).logits, b_model(**kw).logits), name
    derived.close()
    stored.close()


def test_a_version_without_stored_masks_costs_its_merged_vector_only(family, tmp_path):
    derived = _store(tmp_path / "derived", family, MergeParams(density=0.5), store_masks=False)
    stored = _store(tmp_path / "stored", family, MergeParams(density=0.5), store_masks=True)
    d, s = derived.report(ranks=(2,)), stored.report(ranks=(2,))
    assert all(row["mask_bytes"] == 0 for row in d["entries"])
    assert all(row["mask_bytes"] > 0 for row in s["entries"])
    derived.close()
    stored.close()


def test_the_mask_at_nonzero_positions_is_the_dense_mask_there():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(1000, generator=g)
    merged = torch.randn(1000, generator=g) * (torch.rand(1000, generator=g) < 0.3)
    dense = masks_in_pieces("mmer", [tau], merged, [0.8], 1)[0]
    where = merged != 0
    import numpy as np
    bits = torch.from_numpy(np.packbits(where.numpy()))
    assert torch.equal(mask_at_nonzero(tau, bits, merged[where], "mmer", 0.8), dense[where])


def test_a_tensor_read_for_two_readers_is_decoded_once():
    calls = []

    def source(key):
        calls.append(key)
        return torch.zeros(3)

    read = read_once_for_two(source)
    read("a"), read("a"), read("b"), read("b")
    assert calls == ["a", "b"]
