"""The Python API: register, expand (incrementally), rollback, remove, export, load, audit."""

import sqlite3

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import builders
from mmer_cl import MergeParams, export_modality, merge_checkpoints
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.errors import KeyMappingError
from mmer_cl.store import Store, StoreError
from registry import RegistryError


def snapshot(root):
    """Everything a store holds: its blob files and every registry row."""
    files = sorted(str(p.relative_to(root)) for p in (root / "objects").rglob("*") if p.is_file())
    con = sqlite3.connect(root / "registry.db")
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    rows = {t: con.execute(f"SELECT * FROM {t}").fetchall() for t in sorted(tables)}
    con.close()
    return files, rows


@pytest.fixture
def store(family, tmp_path):
    s = Store.init(tmp_path / "store", family / "base", actor="alice")
    s.register(family / "vision", "vision", "vision", "caption", actor="alice")
    s.register(family / "audio", "audio", "audio", "asr", actor="bob")
    yield s
    s.close()


def test_second_expansion_reuses_every_trim_and_is_coded_against_the_first(store, family, tmp_path):
    v1 = store.expand()
    assert v1.created and not v1.incremental
    assert v1.version.details["trimmed"] == []  # register trimmed at the default density already
    store.register(family / "video", "video", "video", "qa")
    v2 = store.expand()
    assert v2.incremental and v2.version.number == 2
    assert v2.version.details["trimmed"] == []
    assert v2.version.details["coded_against"] == "v1"
    v3 = store.expand(MergeParams(density=0.35))  # a new density is trimmed once, then cached
    assert v3.version.details["trimmed"] == ["vision", "audio", "video"]
    store.rollback(2)
    # The incremental result equals a batch merge of all three, exported through the register-free path.
    batch = merge_checkpoints(family / "base", [family / "vision", family / "audio", family / "video"],
                              tmp_path / "batch")
    ours = Checkpoint(store.export("audio", tmp_path / "ours"))
    theirs = Checkpoint(export_modality(batch, "audio", tmp_path / "theirs"))
    for name in theirs.names():
        assert torch.allclose(ours.get(name), theirs.get(name), atol=1e-6), name


def test_a_version_records_where_its_expansion_spent_its_time(store):
    details = store.expand().version.details
    phases = details["phase_seconds"]
    assert set(phases) == {"read", "merge_and_masks", "code"}
    assert all(0 < s <= details["seconds"] for s in phases.values())


def test_expand_without_changes_makes_no_new_version(store):
    store.expand()
    again = store.expand()
    assert not again.created and again.version.number == 1
    changed = store.expand(MergeParams(density=0.5))
    assert changed.created and not changed.incremental and changed.version.number == 2


def test_rollback_moves_current_and_export_follows_it(store, family, tmp_path):
    store.expand()
    store.register(family / "video", "video", "video", "qa")
    store.expand()
    assert store.rollback(1) == ("v2", "v1")
    assert store.version().number == 1
    with pytest.raises(StoreError, match="not in version 1"):
        store.export("video", tmp_path / "video")
    store.export("video", tmp_path / "video", version=2)
    assert [v.number for v in store.versions()] == [1, 2], "rollback deletes nothing"
    with pytest.raises(RegistryError, match="no version 7"):
        store.rollback(7)


def test_load_in_memory_matches_the_exported_checkpoint(store, tmp_path):
    store.expand()
    model = store.load("vision", device="cpu")
    exported = LlavaForConditionalGeneration.from_pretrained(store.export("vision", tmp_path / "v")).eval()
    inputs = builders.llava_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, exported(**inputs).logits)


def test_without_mask_every_entry_gets_the_whole_merged_llm(store, tmp_path):
    store.expand()
    text = Checkpoint(store.export_text(tmp_path / "text"))
    for name in ("vision", "audio"):
        plain = store.load(name, device="cpu", use_mask=False).state_dict()
        assert torch.equal(plain["model.language_model.norm.weight"], text.get("model.norm.weight"))
    masked = store.load("vision", device="cpu").state_dict()
    assert not torch.equal(masked["lm_head.weight"], plain["lm_head.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_export_from_the_stored_sparse_form_writes_the_same_bytes_as_the_dense_path(tmp_path, monkeypatch, dtype):
    base = builders.save_base(tmp_path / "base", dtype=dtype)
    for seed in (1, 2):
        builders.save_llava(base, tmp_path / f"ft{seed}", seed=seed)
    with Store.init(tmp_path / "s", tmp_path / "base") as s:
        s.register(tmp_path / "ft1", "a", "vision")
        s.register(tmp_path / "ft2", "b", "audio")
        s.expand()
        used = []
        sparse_source = s._sparse_source

        def counting(*args, **kwargs):
            read = sparse_source(*args, **kwargs)
            return lambda key: used.append(key) or read(key)

        monkeypatch.setattr(s, "_sparse_source", counting)
        fast = Checkpoint(s.export("a", tmp_path / "fast"))
        assert used, "the export read the sparse form"
        monkeypatch.setattr(s, "_sparse_source", lambda *args, **kwargs: (lambda key: None))
        dense = Checkpoint(s.export("a", tmp_path / "dense"))
        for name in dense.names():
            a, b = fast.get(name), dense.get(name)
            assert a.dtype == b.dtype == (dtype if a.is_floating_point() else a.dtype)
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


def test_single_entry_store_reconstructs_its_model_exactly(family, tmp_path):
    with Store.init(tmp_path / "s", family / "base") as s:
        s.register(family / "video", "video", "video")
        s.expand(MergeParams(density=1.0))
        out = Checkpoint(s.export("video", tmp_path / "out"))
    original = Checkpoint(family / "video")
    assert [f.name for f in out.files] == [f.name for f in original.files], "same shard layout"
    for name in original.names():
        assert torch.equal(out.get(name), original.get(name)), name


def test_registering_the_same_checkpoint_twice_is_recognised(store, family):
    before = snapshot(store.root)
    again = store.register(family / "vision", "vision", "vision")
    assert not again.created and again.entry.name == "vision"
    with pytest.raises(StoreError, match="already registered as entry 'vision'"):  # a second name: refused
        store.register(family / "vision", "vision-again", "vision")
    assert snapshot(store.root) == before


def test_model_from_another_base_is_refused_and_the_store_is_unchanged(store, tmp_path):
    other = builders.save_base(tmp_path / "other-base", seed=99)
    builders.save_llava(other, tmp_path / "foreign", seed=1)
    before = snapshot(store.root)
    with pytest.raises(KeyMappingError, match="another base"):
        store.register(tmp_path / "foreign", "foreign", "vision")
    assert snapshot(store.root) == before


def test_failed_expand_leaves_the_store_exactly_as_before(store, monkeypatch):
    store.expand()
    before = snapshot(store.root)
    import mmer_cl.store.expansion_plan as store_module

    calls = {"n": 0}
    real = store_module.expand_tensor

    def crash_midway(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(store_module, "expand_tensor", crash_midway)
    with pytest.raises(RuntimeError, match="simulated"):
        store.expand(MergeParams(density=0.4))
    assert snapshot(store.root) == before


def test_remove_makes_a_version_without_the_entry_and_history_keeps_it(store, tmp_path):
    store.expand()
    v = store.remove("audio")
    assert [m.entry_name for m in v.members] == ["vision"]
    assert [e.name for e in store.entries()] == ["vision"]
    assert [e.name for e in store.entries(include_removed=True)] == ["vision", "audio"]
    store.export("audio", tmp_path / "audio-v1", version=1)
    assert store.remove("vision") is None
    with pytest.raises(StoreError, match="no current version"):
        store.version()


def test_every_change_is_in_the_append_only_audit_log(store):
    store.expand()
    store.rollback(1, actor="carol")
    events = store.history()
    assert [(e.actor, e.action) for e in events] == [
        ("alice", "init"), ("alice", "register"), ("bob", "register"), (events[3].actor, "expand"),
        ("carol", "rollback")]
    con = sqlite3.connect(store.root / "registry.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM events")
    con.close()


def test_audit_names_a_damaged_blob_and_what_it_breaks(store):
    store.expand(store_masks=True)
    assert store.audit().ok
    mask = next(r for r in store.registry.version_blobs(store.version().id, "mask"))
    path = store.blobs.path(mask.digest)
    path.write_bytes(b"\x00" + path.read_bytes()[1:])
    report = store.audit()
    assert not report.ok
    assert [d.digest for d in report.damaged] == [mask.digest]
    owner = store.registry.entries(store.base().id)
    names = {e.id: e.name for e in owner}
    assert f"version 1 mask of entry {names[mask.entry_id]}, tensor {mask.key}" in report.damaged[0].owners
    assert all(o.startswith("version 1 ") and ", tensor " in o for o in report.damaged[0].owners)


def test_changed_base_is_detected(family, tmp_path):
    import shutil
    shutil.copytree(family / "base", tmp_path / "base")
    with Store.init(tmp_path / "s", tmp_path / "base") as s:
        builders.save_base(tmp_path / "base", seed=123)  # overwritten in place
        with pytest.raises(StoreError, match="changed since"):
            s.register(family / "vision", "vision", "vision")
        assert s.audit(check_base=True).base_problems


def test_report_counts_bytes_and_compares_baselines(store):
    store.expand()
    r = store.report(ranks=(2, 8))
    assert r["llm_params"] == sum(t.numel() for t in Checkpoint(store.base().source_path).infos and
                                  [Checkpoint(store.base().source_path).get(n)
                                   for n in Checkpoint(store.base().source_path).names()])
    e = r["entries"][0]
    assert 0 < e["mask_density"] < 1 and 0 < e["mask_entropy_bound"] <= 1
    # Tiny Llama: hidden 32, intermediate 64, 2 layers; q/o 32x32, k/v 16x32, gate/up 64x32, down 32x64.
    per_layer = 2 * (32 + 32) + 2 * (16 + 32) + 3 * (64 + 32)
    assert r["lora"]["2"]["adapter_bytes_each"] == 2 * 2 * per_layer * 4
    errors = e["fidelity"]["svd_lora_relative_error"]
    assert errors["8"] < errors["2"] <= 1.0
    assert r["full_copies_total_bytes"] == sum(x["full_copy_bytes"] for x in r["entries"]) > 0


def test_bad_names_are_refused_before_any_work(store, family):
    with pytest.raises(Exception, match="invalid entry name"):
        store.register(family / "video", "../evil", "video")


def test_opening_a_missing_store_says_how_to_create_one(tmp_path):
    with pytest.raises(StoreError, match="mmer init"):
        Store.open(tmp_path / "nothing")
