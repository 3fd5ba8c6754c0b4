"""A store written by mmer-cl 0.1.0 (accumulators in every version, one blob per mask) keeps working.

``fixtures/store_v0_1`` was written by release 0.1.0 itself (commit 7daac72): a tiny Llama base, LLaVA
fine-tunes registered as vision, audio (v1, density 0.5) and video (v2, incremental), and the sha256 of
every tensor that release exported for each version.
"""

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import builders
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.method.masks import mmer_mask
from mmer_cl.store import Store

FIXTURE = Path(__file__).parent / "fixtures" / "store_v0_1"


def digests(directory: Path) -> dict[str, str]:
    ckpt = Checkpoint(directory)
    return {n: hashlib.sha256(ckpt.get(n).contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for n in ckpt.names()}


@pytest.fixture
def old_store(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "old")
    root = tmp_path / "old" / "store"
    con = sqlite3.connect(root / "registry.db")
    con.execute("UPDATE base_models SET source_path = ?", (str(tmp_path / "old" / "base"),))  # moved here
    con.commit()
    con.close()
    store = Store.open(root)
    yield store
    store.close()


def test_every_old_version_exports_what_release_0_1_exported(old_store, tmp_path):
    expected = json.loads((FIXTURE / "exports.json").read_text())
    for label, tensors in expected.items():
        name, version = label.split("@v")
        assert digests(old_store.export(name, tmp_path / label, version=int(version))) == tensors, label


def test_an_old_store_expands_again_in_the_new_format(old_store, tmp_path):
    expected = json.loads((FIXTURE / "exports.json").read_text())
    base = LlamaForCausalLM.from_pretrained(tmp_path / "old" / "base")
    builders.save_llava(base, tmp_path / "speech", seed=4)
    old_store.register(tmp_path / "speech", "speech", "audio")
    v3 = old_store.expand()
    assert v3.incremental and v3.version.details["coded_against"] == "v2"
    assert sorted(v3.version.details["trimmed"]) == ["audio", "video", "vision"]  # 0.1 kept no trims
    for label, tensors in expected.items():
        name, version = label.split("@v")
        assert digests(old_store.export(name, tmp_path / f"again-{label}", version=int(version))) == tensors
    # v3 stores no masks: they are derived on read, the mask rule applied to v3's merged vector
    reader, registry = old_store.reader, old_store.registry
    assert not registry.version_blobs(v3.version.id, "mask") and v3.version.details["masks"] == "derived"
    merged_refs = {r.key: r.digest for r in registry.version_blobs(v3.version.id, "merged")}
    merged = {k: reader.tensor(d) for k, d in merged_refs.items()}
    base_rec = old_store.base()
    checked = 0
    for member in v3.version.members:
        entry = registry.entry_by_id(member.entry_id)
        masks = old_store._mask_source(v3.version, base_rec, entry, member, reader, merged.__getitem__)
        for ref in registry.entry_blobs(entry.id, "task_vector"):
            want = mmer_mask(reader.tensor(ref.digest), merged[ref.key])
            assert torch.equal(masks(ref.key), want), ref.key
            checked += 1
    assert checked == 4 * len(merged)
    for name in ("vision", "audio", "video", "speech"):  # and every entry of v3 exports
        assert Checkpoint(old_store.export(name, tmp_path / f"{name}-v3")).names()
    assert old_store.audit().ok
    report = old_store.report(svd=False)
    assert report["on_disk"]["legacy_accumulators"] > 0  # still on disk: versions 1 and 2 use them


def test_an_old_store_gets_manifests_on_its_first_write_locked_open_and_is_trusted_until_then(tmp_path):
    """Release 0.1 wrote no manifests. An open that cannot take the writer lock at once (another writer at
    work; or a read-only store) leaves them for later: audit trusts the rows, and says so. The next open
    that can writes one per entry and version, logged, and audit then checks every row against them."""
    from mmer_cl.store.locks import file_lock

    shutil.copytree(FIXTURE, tmp_path / "old")
    root = tmp_path / "old" / "store"
    con = sqlite3.connect(root / "registry.db")
    con.execute("UPDATE base_models SET source_path = ?", (str(tmp_path / "old" / "base"),))
    con.commit()
    con.close()
    Store.open(root).close()  # migrated; identity settled
    con = sqlite3.connect(root / "registry.db")  # as it was before this release wrote any manifest
    con.execute("UPDATE entries SET manifest = NULL")
    con.execute("UPDATE versions SET manifest = NULL")
    con.execute("DELETE FROM meta WHERE key = 'manifests'")
    con.commit()
    con.close()
    with file_lock(root / ".lock"), Store.open(root) as s:  # another writer holds the lock: not written now
        rep = s.audit()
        assert rep.ok and rep.undescribed == 5 and not s.registry.manifests_complete()
    with Store.open(root) as s:
        assert s.registry.manifests_complete()
        rep = s.audit()
        assert rep.ok and rep.undescribed == 0 and rep.unreferenced == 0
        logged = [(e.action, e.after) for e in s.history() if e.action == "manifests"]
        assert logged == [("manifests", "3 entries, 2 versions")] * 2  # on migrating, and again here
        v2 = s.registry.version_facts()
        assert [f.parent is not None for f in v2] == [False, True]  # version 2's manifest names version 1's
