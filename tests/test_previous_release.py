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
from mmer_cl.checkpoint import Checkpoint
from mmer_cl.masks import mmer_mask
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
    # v3's masks, coded against release 0.1's masks, are the mask rule applied to v3's merged vector
    reader, registry = old_store.reader, old_store.registry
    merged = {r.key: reader.tensor(r.digest) for r in registry.version_blobs(v3.version.id, "merged")}
    checked = 0
    for ref in registry.version_blobs(v3.version.id, "mask"):
        tau_ref = next(r for r in registry.entry_blobs(ref.entry_id, "task_vector") if r.key == ref.key)
        want = mmer_mask(reader.tensor(tau_ref.digest), merged[ref.key])
        assert torch.equal(reader.tensor(ref.digest, ref.key), want), ref.key
        checked += 1
    assert checked == 4 * len(merged)
    for name in ("vision", "audio", "video", "speech"):  # and every entry of v3 exports
        assert Checkpoint(old_store.export(name, tmp_path / f"{name}-v3")).names()
    assert old_store.audit().ok
    report = old_store.report(svd=False)
    assert report["on_disk"]["legacy_accumulators"] > 0  # still on disk: versions 1 and 2 use them
