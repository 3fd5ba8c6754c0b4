"""How versions are stored: coded against the previous version, immutable, exported bit for bit."""

from pathlib import Path

import pytest
import torch

import mmer_cl.store.expansion_plan as expansion_plan
import storage.delta as delta
from mmer_cl import MergeParams
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.store import Store
from storage import header_of


STAMPED = ("README.md", "MMER_CARD.md", ".mmer-export.json")  # the model card and the marker hold the export time


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name not in STAMPED}


def tensor_bytes_of(directory: Path) -> dict[str, bytes]:
    """Every tensor's raw bytes (provenance metadata, which names the version, left aside)."""
    ckpt = Checkpoint(directory)
    return {n: ckpt.get(n).contiguous().view(-1).view(torch.uint8).numpy().tobytes() for n in ckpt.names()}


@pytest.fixture
def grown(family, tmp_path):
    """A store that gained its entries one expansion at a time: v1 (vision, audio), v2 (+ video)."""
    s = Store.init(tmp_path / "store", family / "base", actor="ci")
    s.register(family / "vision", "vision", "vision")
    s.register(family / "audio", "audio", "audio")
    s.expand(MergeParams(density=0.3))
    s.register(family / "video", "video", "video")
    s.expand()
    yield s
    s.close()


def test_a_later_version_stores_only_what_changed(grown):
    v2 = grown.version(2)
    merged = grown.registry.version_blobs(v2.id, "merged")
    codecs = [header_of(grown.blobs.get(r.digest))["codec"] for r in merged]
    # Adding one entry at density 0.3 changes the merged vector on at most ~30% of positions: mostly deltas.
    assert codecs.count("delta") >= len(codecs) / 2 and set(codecs) <= {"delta", "sparse"}
    v1 = grown.version(1)
    assert sum(r.stored_bytes for r in merged) < sum(r.stored_bytes for r in grown.registry.version_blobs(v1.id, "merged"))
    video = grown.registry.entry(1, "video").id
    coded = []
    for r in grown.registry.version_blobs(v2.id, "mask"):
        assert header_of(grown.blobs.get(r.digest))["codec"] == "maskpack"
        member = next(m for m in grown.reader.members(r.digest) if m["key"] == r.key)
        if r.entry_id == video:
            assert "parent" not in member  # the new entry's masks are whole
        else:
            coded.append("parent" in member)
    assert sum(coded) >= len(coded) / 2  # earlier entries' masks: mostly changes to v1's


def test_a_delta_coded_version_equals_expanding_the_same_entries_from_scratch(grown, family, tmp_path):
    fresh = Store.init(tmp_path / "fresh", family / "base", actor="ci")
    for name in ("vision", "audio", "video"):
        fresh.register(family / name, name, name)
    fresh.expand(MergeParams(density=0.3))
    for name in ("vision", "audio", "video"):
        ours = tensor_bytes_of(grown.export(name, tmp_path / "ours" / name))
        theirs = tensor_bytes_of(fresh.export(name, tmp_path / "theirs" / name))
        assert ours == theirs, name


def test_old_versions_export_bit_for_bit_after_expansions_removals_and_rollbacks(grown, family, tmp_path):
    before = {(v, n): files_of(grown.export(n, tmp_path / f"before-{v}-{n}", version=v))
              for v, names in ((1, ["vision", "audio"]), (2, ["vision", "audio", "video"])) for n in names}
    grown.remove("audio")
    grown.expand(MergeParams(density=0.5, lam=0.8))
    grown.rollback(2)
    grown.register(family / "audio", "audio2", "audio")
    grown.expand()
    for (v, n), files in before.items():
        assert files_of(grown.export(n, tmp_path / f"after-{v}-{n}", version=v)) == files, (v, n)
    assert grown.audit().ok


def test_reads_never_walk_more_than_the_maximum_chain_and_chains_are_cut_a_few_tensors_at_a_time(
        family, tmp_path, monkeypatch):
    monkeypatch.setattr(delta, "MAX_DEPTH", 2)
    s = Store.init(tmp_path / "store", family / "base", actor="ci")
    s.register(family / "vision", "vision", "vision")
    s.expand(MergeParams(density=0.2))
    reference = files_of(s.export("vision", tmp_path / "v1"))
    for name in ("audio", "video"):  # v2 and v3: each coded against the one before
        s.register(family / name, name, name)
        s.expand()
    s.remove("audio")  # v4
    phases = expansion_plan.rebase_phases(expansion_plan.llm_shapes(s.registry.base_tensors(s.base().id)), 2)
    assert set(phases.values()) == {0, 1}
    before: dict = {}
    for v in s.versions():
        merged = {r.key: r.digest for r in s.registry.version_blobs(v.id, "merged")}
        depths = {key: s.reader.depth(d) for key, d in merged.items()}
        assert max(depths.values()) < 2  # cut by phase before the encoders' own limit
        whole = {key for key, d in merged.items() if depths[key] == 0 and d != before.get(key)}
        if v.number > 1:  # only the tensors at this version's phase are written whole
            assert whole and whole <= {key for key, p in phases.items() if p == v.number % 2}
        before = merged
    assert files_of(s.export("vision", tmp_path / "again", version=1)) == reference


def test_rebase_phases_spread_the_parameters_evenly_and_depend_on_the_shapes_alone():
    shapes = {"embed": (1000, 64), "head": (1000, 64), **{f"l{i}": (64, 64) for i in range(40)}, "norm": (64,)}
    phases = expansion_plan.rebase_phases(shapes, 4)
    load = [0] * 4
    for key, p in phases.items():
        load[p] += torch.Size(shapes[key]).numel()
    assert max(load) - min(load) <= 64 * 64  # within one small tensor
    assert phases == expansion_plan.rebase_phases(dict(reversed(list(shapes.items()))), 4)


def test_trims_are_computed_once_per_entry_and_density(grown, monkeypatch):
    calls = []
    real = expansion_plan.expand_tensor

    def spy(taus, params, tensor_name="", thresholds=None, **kw):
        calls.append(sum(t is None for t in thresholds))
        return real(taus, params, tensor_name=tensor_name, thresholds=thresholds, **kw)

    monkeypatch.setattr(expansion_plan, "expand_tensor", spy)
    grown.expand(MergeParams(density=0.3, lam=0.9))  # same density: every trim is cached
    assert calls and set(calls) == {0}


def test_the_report_counts_every_byte_du_counts_once_the_store_is_closed(grown, family, tmp_path):
    import subprocess

    import builders
    from transformers import LlamaForCausalLM

    builders.save_llava(LlamaForCausalLM.from_pretrained(family / "base"), tmp_path / "speech", seed=4)
    grown.register(tmp_path / "speech", "speech", "audio")  # registered but not merged yet: still counted
    r = grown.report(svd=False)
    grown.close()  # as after `mmer report`: SQLite's log and index of the open connection are gone
    du = int(subprocess.run(["du", "-sb", str(grown.root)], capture_output=True, text=True).stdout.split()[0])
    assert r["on_disk"]["total"] == du
    assert r["on_disk"]["task_vectors"] > 0 and r["on_disk"]["registry"] > 0
    assert r["merged_raw_bytes"] > 0
    assert r["deployment"]["total"] == r["base_bytes"] + r["merged_bytes"] + sum(
        e["mask_bytes"] + e["modality_side_bytes"] for e in r["entries"])


def test_masks_of_small_tensors_cost_close_to_their_entropy(tmp_path):
    examples = Path(__file__).parents[1] / "examples" / "checkpoints"
    s = Store.init(tmp_path / "store", examples / "base", actor="ci")
    for name in ("vision_digit", "audio_digit", "audio_speaker"):  # 64x64 to 64x256 tensors
        s.register(examples / "seed0" / name, name, name)
    s.expand(MergeParams(density=0.5))
    for e in s.report(svd=False)["entries"]:
        assert e["mask_bits_per_param"] <= 1.1 * e["mask_entropy_bound"], e


def test_an_entry_registered_by_reference_keeps_no_task_vector_and_merges_the_same(family, tmp_path):
    import shutil

    copied = Store.init(tmp_path / "copied", family / "base", actor="ci")
    referenced = Store.init(tmp_path / "referenced", family / "base", actor="ci")
    shutil.copytree(family / "audio", tmp_path / "audio")
    for s, ref in ((copied, False), (referenced, True)):
        s.register(family / "vision", "vision", "vision")
        s.register(tmp_path / "audio", "audio", "audio", reference=ref)
        s.expand(MergeParams(density=0.3))
    assert not referenced.registry.entry_blobs(referenced.registry.entry(1, "audio").id, "task_vector")
    r = referenced.report(svd=False)
    assert [e["referenced"] for e in r["entries"]] == [False, True]
    assert r["on_disk"]["task_vectors"] < copied.report(svd=False)["on_disk"]["task_vectors"]
    for name in ("vision", "audio"):
        assert tensor_bytes_of(copied.export(name, tmp_path / "c" / name)) == \
            tensor_bytes_of(referenced.export(name, tmp_path / "r" / name))

    # The checkpoint changes where it lies: the next expansion names it and changes nothing.
    from mmer_cl.checkpoints.references import ReferenceError

    shard = sorted((tmp_path / "audio").glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = referenced.versions()
    assert any("entry audio" in p for p in referenced.audit(check_base=True).base_problems)
    with pytest.raises(ReferenceError, match=str(tmp_path / "audio")):
        referenced.expand(MergeParams(density=0.5))
    assert referenced.versions() == before
    shutil.rmtree(tmp_path / "audio")
    with pytest.raises(ReferenceError, match="can no longer be read"):
        referenced.expand(MergeParams(density=0.5))
    assert tensor_bytes_of(referenced.export("audio", tmp_path / "r2")) == tensor_bytes_of(tmp_path / "r" / "audio")


def test_the_largest_tensor_groups_are_never_read_side_by_side():
    from mmer_cl.store.expansion_plan import TensorJob, _spaced

    def group(key, numel):
        return (TensorJob(key=key, numel=numel, task_vectors=(), thresholds=(), prev_merged=None, prev_masks=()),)

    groups = [group("lm_head.weight", 100), group("model.embed_tokens.weight", 100), group("a", 10),
              group("b", 5), group("c", 1)]
    order = [g[0].key for g in _spaced(groups)]
    assert sorted(order) == sorted(g[0].key for g in groups)  # every group once
    assert order == ["lm_head.weight", "c", "model.embed_tokens.weight", "b", "a"]
    assert _spaced(list(reversed(groups))) == _spaced(groups)  # deterministic whatever the input order


def _grow(path: Path, family: Path, second: MergeParams | None = None) -> Store:
    s = Store.init(path, family / "base", actor="ci")
    s.register(family / "vision", "vision", "vision")
    s.register(family / "audio", "audio", "audio")
    s.expand(MergeParams(density=0.3), store_masks=True)
    s.register(family / "video", "video", "video")
    s.expand(second, store_masks=True)
    return s


def _version_blobs(s: Store, number: int) -> list[tuple]:
    return sorted((r.role, r.key, r.entry_id, r.digest) for r in s.registry.version_blobs(s.version(number).id))


def test_an_incremental_expansion_codes_earlier_masks_without_reading_them_and_stores_the_same_blobs(
        family, tmp_path, monkeypatch):
    """With the same parameters, an earlier entry's mask can change only where the merged vector changed:
    the expansion only locates the previous masks, and stores what reading and checking them would."""
    reads = []
    real = expansion_plan._decoded

    def spy(reader, digest, key=None, read=True):
        reads.append((key, read))
        return real(reader, digest, key, read)

    monkeypatch.setattr(expansion_plan, "_decoded", spy)
    trusting = _grow(tmp_path / "trusting", family)
    masks_seen = [read for key, read in reads if key is not None]
    assert masks_seen and not any(masks_seen)  # every previous mask located, none decoded
    monkeypatch.setattr(expansion_plan, "_masks_follow_merged", lambda *args: False)
    reads.clear()
    checking = _grow(tmp_path / "checking", family)
    assert all(read for key, read in reads if key is not None)
    assert _version_blobs(trusting, 2) == _version_blobs(checking, 2)
    trusting.close()
    checking.close()


def test_earlier_masks_are_read_and_checked_where_the_parameters_could_move_them_anywhere():
    follow = expansion_plan._masks_follow_merged
    same = MergeParams()
    assert follow(same, same, ["vision"])
    assert follow(same, MergeParams(lam_per_entry={"video": 0.5}), ["vision"])  # only the new entry's lambda
    assert not follow(same, MergeParams(alpha=0.8), ["vision"])  # the merged vector moves everywhere
    assert not follow(same, MergeParams(lam=0.9), ["vision"])
    assert not follow(same, MergeParams(lam_per_entry={"vision": 0.9}), ["vision"])
    assert not follow(same, MergeParams(mask_rule="emr"), ["vision"])
    assert follow(MergeParams(mask_rule="emr"), MergeParams(mask_rule="emr"), ["vision"])
    consensus = MergeParams(mask_rule="consensus")  # a new entry's votes move the shared mask anywhere
    assert not follow(consensus, consensus, ["vision"])


@pytest.mark.parametrize("second", [MergeParams(density=0.3, alpha=0.8), MergeParams(density=0.3, lam=0.7),
                                    MergeParams(density=0.3, mask_rule="consensus")])
def test_an_incremental_expansion_with_other_mask_parameters_equals_one_from_scratch(family, tmp_path, second):
    grown = _grow(tmp_path / "grown", family, second)
    assert grown.version(2).details["incremental"]
    fresh = Store.init(tmp_path / "fresh", family / "base", actor="ci")
    for name in ("vision", "audio", "video"):
        fresh.register(family / name, name, name)
    fresh.expand(second)
    for name in ("vision", "audio", "video"):
        ours = tensor_bytes_of(grown.export(name, tmp_path / "ours" / name))
        theirs = tensor_bytes_of(fresh.export(name, tmp_path / "theirs" / name))
        assert ours == theirs, name
    grown.close()
    fresh.close()


def test_a_blob_that_fails_to_decode_fails_the_expansion_and_records_no_version(family, tmp_path, monkeypatch):
    s = Store.init(tmp_path / "store", family / "base", actor="ci")
    s.register(family / "vision", "vision", "vision")
    s.register(family / "audio", "audio", "audio")
    real = expansion_plan.task_vector_from_spec
    calls = []

    def failing(reader, spec, device, checkpoints):
        calls.append(spec)
        if len(calls) == 5:
            raise OSError("disk gone")
        return real(reader, spec, device, checkpoints)

    monkeypatch.setattr(expansion_plan, "task_vector_from_spec", failing)
    with pytest.raises(OSError, match="disk gone"):
        s.expand(MergeParams(density=0.3))
    assert s.versions() == []
    s.close()


def _touching_one_tensor(base_dir: Path, out: Path, key: str, seed: int) -> Path:
    """A text-only fine-tune of the base that changes only tensor ``key``."""
    import shutil

    from safetensors.torch import save_file

    base = Checkpoint(base_dir)
    tensors = {n: base.get(n).clone() for n in base.names()}
    gen = torch.Generator().manual_seed(seed)
    tensors[key] = tensors[key] + 0.005 * torch.randn(tensors[key].shape, generator=gen).to(tensors[key].dtype)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    shutil.copyfile(base_dir / "config.json", out / "config.json")
    return out


def test_a_tensor_that_no_new_entry_changes_keeps_its_blobs_even_where_a_chain_is_at_its_longest(
        family, tmp_path, monkeypatch):
    monkeypatch.setattr(delta, "MAX_DEPTH", 1)  # v2 is a chain's longest: v3 cannot be coded against it
    s = Store.init(tmp_path / "store", family / "base", actor="ci")
    keys = [n for n in Checkpoint(family / "base").names() if n.endswith("q_proj.weight")]
    s.register(family / "vision", "vision", "vision")
    s.register(family / "audio", "audio", "audio")
    s.expand(MergeParams(density=0.3))
    s.register(_touching_one_tensor(family / "base", tmp_path / "one", keys[0], 1), "one", "text")
    s.expand()
    s.register(_touching_one_tensor(family / "base", tmp_path / "two", keys[1], 2), "two", "text")
    s.expand()
    refs = {n: {(r.role, r.key, r.entry_id): r.digest for r in s.registry.version_blobs(s.version(n).id)}
            for n in (2, 3)}
    untouched = [key for (role, key, _), _ in refs[3].items() if role == "merged" and key != keys[1]]
    assert untouched
    for key in untouched:  # the same merged blob, and every earlier entry's mask pack, at no new depth
        assert refs[3][("merged", key, None)] == refs[2][("merged", key, None)], key
        for (role, k, entry), digest in refs[2].items():
            if role == "mask" and k == key:
                assert refs[3][(role, k, entry)] == digest, key
    fresh = Store.init(tmp_path / "fresh", family / "base", actor="ci")
    for name, path in (("vision", family / "vision"), ("audio", family / "audio"), ("one", tmp_path / "one"),
                       ("two", tmp_path / "two")):
        fresh.register(path, name, name if name in ("vision", "audio") else "text")
    fresh.expand(MergeParams(density=0.3))
    for name in ("vision", "one", "two"):
        assert tensor_bytes_of(s.export(name, tmp_path / "ours" / name)) == \
            tensor_bytes_of(fresh.export(name, tmp_path / "theirs" / name)), name
    s.close()
    fresh.close()


def test_decoders_follow_the_cores_and_mmer_decoders_caps_them(monkeypatch):
    monkeypatch.delenv("MMER_DECODERS", raising=False)
    monkeypatch.setattr(expansion_plan.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert expansion_plan.decoder_count() == 2  # one per core this process may run on
    monkeypatch.setattr(expansion_plan.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert expansion_plan.decoder_count() == 4  # at most 4: each holds a decode's scratch memory
    monkeypatch.setenv("MMER_DECODERS", "1")
    assert expansion_plan.decoder_count() == 1
    monkeypatch.setenv("MMER_DECODERS", "not a number")  # ignored
    assert expansion_plan.decoder_count() == 4
