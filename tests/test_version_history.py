"""Every version of a store with history (revisions, removals, rollbacks) exports, loads and composes as it was.

An entry updated with ``register --update`` has two revisions; a version holds one of them.
``export``, ``load`` and ``compose`` of a version must use the revision that version holds, never the
newest: each version's exports are captured when it is made, and every later state of the store
must give the same tensors for it through all three paths.
"""

from __future__ import annotations

from pathlib import Path

import torch

import builders
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from mmer_cl import MergeParams
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.checkpoints.keymap import KeyMap
from mmer_cl.store import Store

PARAMS = MergeParams(density=0.5)


def exported(store: Store, name: str, version: int, out: Path) -> dict[str, torch.Tensor]:
    """The export's tensors; the directory is left at ``out / "last"``."""
    path = store.export(name, out / "last", version=version, overwrite=True)
    ckpt = Checkpoint(path)
    return {k: ckpt.get(k) for k in ckpt.names()}


def snapshot(store: Store, version: int, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each member's export, taken while ``version`` is the newest."""
    return {m.entry_name: exported(store, m.entry_name, version, out) for m in store.version(version).members}


def assert_version_unchanged(store: Store, version: int, expected: dict[str, dict[str, torch.Tensor]],
                             out: Path) -> None:
    v = store.version(version)
    assert sorted(m.entry_name for m in v.members) == sorted(expected)
    composed = store.compose(version=version)
    for name, tensors in expected.items():
        now = exported(store, name, version, out)
        assert now.keys() == tensors.keys()
        assert all(torch.equal(now[k], tensors[k]) for k in tensors), (version, name, "export")
        loaded = store.load(name, version=version).state_dict()
        entry = store.registry.entry_by_id(v.member(name).entry_id)
        to_ckpt = KeyMap.from_json(entry.keymap).base_to_ckpt()
        route = composed.route_of[name]
        for base_key, ckpt_key in to_ckpt.items():
            rt = composed.tensors[base_key]
            routed = rt.make_resident(route) if rt.can_reside(route) else rt.get(route, composed.cache)
            assert torch.equal(routed, tensors[ckpt_key]), (version, name, "compose", base_key)
        from_export = LlavaForConditionalGeneration.from_pretrained(out / "last").state_dict()
        assert loaded.keys() == from_export.keys()
        assert all(torch.equal(loaded[k], from_export[k]) for k in loaded), (version, name, "load")


def test_every_version_of_a_store_with_updates_removals_and_rollbacks_keeps_its_weights(family, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    history: dict[int, dict] = {}
    with Store.init(tmp_path / "store", family / "base", actor="t") as store:
        store.register(family / "vision", "vision", "vision")
        store.register(family / "audio", "audio", "audio")
        history[1] = snapshot(store, store.expand(PARAMS).version.number, out)

        # a new revision of vision, not yet expanded: v1 still holds (and composes) revision 1
        store.register(family / "video", "vision", "vision", update=True)
        assert_version_unchanged(store, 1, history[1], out)

        history[2] = snapshot(store, store.expand(PARAMS).version.number, out)
        assert any(not torch.equal(history[2]["vision"][k], history[1]["vision"][k]) for k in history[1]["vision"])
        builders.save_llava(LlamaForCausalLM.from_pretrained(family / "base"), tmp_path / "speech", seed=4)
        store.register(tmp_path / "speech", "speech", "audio")
        history[3] = snapshot(store, store.expand(PARAMS).version.number, out)
        history[4] = snapshot(store, store.remove("audio").number, out)
        store.rollback(2)
        assert store.version().number == 2
        history[5] = snapshot(store, store.expand(PARAMS).version.number, out)  # from the active entries

        for version, expected in history.items():
            assert_version_unchanged(store, version, expected, out)
