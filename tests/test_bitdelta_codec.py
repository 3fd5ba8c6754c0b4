"""The ``bitdelta`` entry codec: 1-bit deltas (BitDelta, training-free), lossy, chosen per entry.

``mmer register --codec bitdelta`` keeps, per LLM matrix of the fine-tune, the sign of its change and one
float32 scale (the mean absolute change); 1-D and tiny tensors are kept exactly. Such an entry takes no part
in the MMER merge and is served from its own delta at every version. These tests read as its specification.
"""

import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mmer_cl import MergeParams
from mmer_cl.method import bitdelta
from mmer_cl.store.bitdelta_entries import ROLES
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.cli import cli
from mmer_cl.errors import ConfigError, MmerError
from mmer_cl.store.report_tables import format_report
from mmer_cl.store import Store, StoreError
from mmer_cl.method.task_vector import task_vector

PREFIX = "language_model."  # the LLaVA fine-tunes' LLM keys are the base's keys under this prefix


# ---- the math -----------------------------------------------------------------------------------
def test_a_matrix_is_its_sign_plane_and_one_float32_scale_the_mean_absolute_change():
    tau = torch.tensor([[0.5, -0.25, 0.0, 1.0]] * 16, dtype=torch.float32)
    code = bitdelta.encode(tau)
    assert torch.equal(code.signs, tau > 0)  # a zero change takes the bit of -1: one bit cannot hold 0
    assert code.scale == float(torch.tensor(1.75 / 4, dtype=torch.float32))
    decoded = bitdelta.decode(code)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, torch.where(tau > 0, code.scale, -code.scale).float())


@pytest.mark.parametrize("block", [bitdelta.SUM_BLOCK, 1000])
def test_the_scale_is_summed_in_float64_and_rounded_once_to_float32(block, monkeypatch):
    monkeypatch.setattr(bitdelta, "SUM_BLOCK", block)  # large tensors are summed block by block
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(300, 70, generator=gen, dtype=torch.float64) * 1e-3
    exact = math.fsum(abs(v) for v in tau.reshape(-1).tolist()) / tau.numel()
    assert bitdelta.mean_abs(tau) == float(torch.tensor(exact, dtype=torch.float32))
    assert bitdelta.mean_abs(tau) == bitdelta.mean_abs(tau.clone())  # the same on every run


def test_1d_and_tiny_tensors_are_kept_exactly_matrices_take_one_bit():
    assert not bitdelta.takes_one_bit((4096,))  # norm scales, biases
    assert not bitdelta.takes_one_bit((4, 8))  # fewer than MIN_ELEMENTS
    assert bitdelta.takes_one_bit((8, 8)) and bitdelta.takes_one_bit((2, 4, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reconstruction_is_base_plus_signed_scale_cast_once_to_the_base_dtype(dtype):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(48, 40, generator=gen).to(dtype)
    tuned = (base.double() + torch.randn(48, 40, generator=gen, dtype=torch.float64) * 0.01).to(dtype)
    tau = task_vector(base, tuned)  # exact: float32 for bf16/fp16, float64 for float32
    code = bitdelta.encode(tau)
    out = bitdelta.reconstruct(base, code)
    signed = torch.where(tau > 0, code.scale, -code.scale).double()
    assert out.dtype == dtype
    assert torch.equal(out, (base.double() + signed).to(dtype))
    assert torch.equal(bitdelta.reconstruct(base, bitdelta.encode(task_vector(base, base))), base)  # unchanged


# ---- the store ----------------------------------------------------------------------------------
def reference(family: Path, name: str) -> dict[str, torch.Tensor]:
    """What a 1-bit export must hold, computed here from the checkpoints alone: per LLM matrix
    base + mean|tau| * sign(tau) (float64 sum, float32 scale), every other tensor as fine-tuned."""
    base, tuned = Checkpoint(family / "base"), Checkpoint(family / name)
    out = {}
    for key in tuned.names():
        t = tuned.get(key)
        if not key.startswith(PREFIX):
            out[key] = t
            continue
        b = base.get(key[len(PREFIX):])
        tau = t.double() - b.double()
        if tau.dim() < 2 or tau.numel() < bitdelta.MIN_ELEMENTS:
            out[key] = t
            continue
        scale = float(torch.tensor(tau.abs().sum().item() / tau.numel(), dtype=torch.float32))
        out[key] = (b.double() + torch.where(tau > 0, scale, -scale)).to(b.dtype)
    return out


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(directory)
    return {n: ckpt.get(n) for n in ckpt.names()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def delta_bytes(store: Store, name: str, roles) -> int:
    entry = store.registry.entry(store.base().id, name)
    return sum(r.stored_bytes for r in store.registry.entry_blobs(entry.id) if r.role in roles)


def test_register_then_export_is_base_plus_the_1bit_delta_bit_for_bit(family, tmp_path):
    with Store.init(tmp_path / "store", family / "base") as s:
        entry = s.register(family / "audio", "audio", "audio", codec="bitdelta").entry
        assert entry.codec == "bitdelta"
        first = tensors(s.export("audio", tmp_path / "a1"))  # no version is needed
        assert same(first, reference(family, "audio"))
        assert same(tensors(s.export("audio", tmp_path / "a2")), first)  # reproducible
        meta = Checkpoint(tmp_path / "a1")
        assert json.loads((tmp_path / "a1" / ".mmer-export.json").read_text())["codec"] == "bitdelta"
        assert "lossy" in (tmp_path / "a1" / "README.md").read_text()
        assert meta.names()
        loaded = s.load("audio")  # in memory: the same tensors
        state = loaded.state_dict()
        assert all(torch.equal(state[k], first[k]) for k in first if k in state)


def test_its_bytes_are_a_small_fraction_of_the_lossless_task_vector(family, tmp_path):
    with Store.init(tmp_path / "one-bit", family / "base") as s:
        s.register(family / "audio", "audio", "audio", codec="bitdelta")
        one_bit = delta_bytes(s, "audio", ROLES)
    with Store.init(tmp_path / "lossless", family / "base") as s:
        s.register(family / "audio", "audio", "audio")
        lossless = delta_bytes(s, "audio", {"task_vector"})
        params = s.registry.entry(s.base().id, "audio").stats["llm_params"]
    print(f"bitdelta {one_bit} B ({8 * one_bit / params:.2f} bits/param) vs lossless {lossless} B "
          f"({8 * lossless / params:.2f} bits/param), {params} LLM parameters")
    assert one_bit * 8 < lossless


def test_expand_merges_only_lossless_entries_and_their_exports_do_not_change(family, tmp_path):
    params = MergeParams(density=0.5)
    with Store.init(tmp_path / "without", family / "base") as s:
        s.register(family / "vision", "vision", "vision")
        s.register(family / "video", "video", "video")
        s.expand(params)
        want = {n: tensors(s.export(n, tmp_path / f"without-{n}")) for n in ("vision", "video")}
    with Store.init(tmp_path / "mixed", family / "base") as s:
        s.register(family / "vision", "vision", "vision")
        s.register(family / "audio", "audio", "audio", codec="bitdelta")
        s.register(family / "video", "video", "video")
        v = s.expand(params).version
        assert [m.entry_name for m in v.members] == ["vision", "video"]  # the 1-bit entry needs no merging
        for n in ("vision", "video"):
            assert same(tensors(s.export(n, tmp_path / f"mixed-{n}")), want[n]), n
        assert same(tensors(s.export("audio", tmp_path / "mixed-audio", version=1)), reference(family, "audio"))
        with pytest.raises(StoreError, match="1-bit delta.*export --entry audio"):
            s.compose(["vision", "audio"])
        with pytest.raises(StoreError, match="never merged"):
            s.expand(params, members=["vision", "audio"])
        assert s.remove("audio").number == 1  # in no version: removed without a new one
        assert s.version().number == 1 and s.audit().ok


def test_an_update_to_a_1bit_revision_is_served_at_once_and_the_version_keeps_the_merged_one(family, tmp_path):
    with Store.init(tmp_path / "store", family / "base") as s:
        s.register(family / "vision", "vision", "vision")
        s.expand()
        merged_r1 = tensors(s.export("vision", tmp_path / "r1"))
        assert s.register(family / "audio", "vision", codec="bitdelta", update=True).entry.revision == 2
        assert same(tensors(s.export("vision", tmp_path / "r2")), reference(family, "audio"))  # needs no expand
        assert same(tensors(s.export("vision", tmp_path / "r1-again", version=1)), merged_r1)  # history kept


def test_a_store_of_only_1bit_entries_has_nothing_to_merge_and_says_so(family, tmp_path):
    with Store.init(tmp_path / "store", family / "base") as s:
        with pytest.raises(ConfigError, match="unknown codec 'zip'; choose lossless .* or bitdelta"):
            s.register(family / "audio", "audio", "audio", codec="zip")
        s.register(family / "audio", "audio", "audio", codec="bitdelta")
        with pytest.raises(StoreError, match="already registered as entry 'audio' with codec 'bitdelta'"):
            s.register(family / "audio", "audio", "audio")
        with pytest.raises(StoreError, match="nothing to merge: audio is stored as 1-bit deltas"):
            s.expand()


def test_report_and_entries_mark_it_lossy_with_its_bytes(family, tmp_path):
    with Store.init(tmp_path / "store", family / "base") as s:
        s.register(family / "vision", "vision", "vision")
        s.register(family / "audio", "audio", "audio", codec="bitdelta")
        s.expand()
        r = s.report(svd=False)
        expected = delta_bytes(s, "audio", ROLES)
    assert [(e["name"], e["codec"], e["lossy"]) for e in r["entries"]] == [("vision", "lossless", False)]
    (row,) = r["bitdelta_entries"]
    assert (row["name"], row["codec"], row["lossy"], row["delta_bytes"]) == ("audio", "bitdelta", True, expected)
    assert r["on_disk"]["bitdelta_deltas"] >= expected and r["bitdelta_total_bytes"] > expected
    text = format_report(r)
    assert "LOSSY" in text and "bitdelta (lossy)" in text


def test_audit_checks_its_blobs_and_gc_keeps_them(family, tmp_path):
    with Store.init(tmp_path / "store", family / "base") as s:
        entry = s.register(family / "audio", "audio", "audio", codec="bitdelta").entry
        digests = {r.digest for r in s.registry.entry_blobs(entry.id) if r.role in ROLES}
        assert digests <= set(s.registry.blob_owners())
        assert s.gc().removed == 0 and s.audit().ok
    victim = next(iter(sorted(digests)))
    path = next(p for p in (tmp_path / "store" / "objects").rglob(f"*{victim[2:]}*") if p.is_file())
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with Store.open(tmp_path / "store") as s:
        rep = s.audit()
        assert not rep.ok and [d.digest for d in rep.damaged] == [victim]
    path.unlink()
    with Store.open(tmp_path / "store") as s:
        assert not s.audit().ok  # a lost sign plane is named too; nothing exports half of an entry
        with pytest.raises(MmerError, match="missing"):
            tensors(s.export("audio", tmp_path / "out"))


def test_a_store_of_the_previous_schema_opens_and_its_entries_are_lossless(family, tmp_path):
    root = tmp_path / "store"
    with Store.init(root, family / "base") as s:
        s.register(family / "vision", "vision", "vision")
        s.expand()
        want = tensors(s.export("vision", tmp_path / "before"))
    con = sqlite3.connect(root / "registry.db")  # as schema 4 wrote it: no codec column
    con.execute("ALTER TABLE entries DROP COLUMN codec")
    con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with Store.open(root) as s:
        assert [(e.before, e.after) for e in s.history() if e.action == "migrate"] == [("schema 4", "schema 5")]
        assert [e.codec for e in s.entries()] == ["lossless"]
        assert s.audit().ok  # manifests written before the codec existed still match their rows
        assert same(tensors(s.export("vision", tmp_path / "after")), want)
        s.register(family / "audio", "audio", "audio", codec="bitdelta")
        assert s.audit().ok


# ---- the command line ---------------------------------------------------------------------------
def run(tmp_path: Path, *args, code: int = 0):
    result = CliRunner().invoke(cli, ["--store", str(tmp_path / "store"), "--actor", "ci", "-q", *map(str, args)])
    assert result.exit_code == code, result.output
    return result.output


def test_cli_register_codec_bitdelta_then_entries_and_export(family, tmp_path):
    run(tmp_path, "init", "--base", family / "base")
    out = run(tmp_path, "register", family / "audio", "--name", "audio", "--modality", "audio", "--codec", "bitdelta")
    assert "LLM tensors stored as 1-bit deltas" in out and "1-bit deltas (lossy" in out
    assert "bitdelta (lossy)" in run(tmp_path, "entries")
    (entry,) = json.loads(run(tmp_path, "entries", "--json"))
    assert entry["codec"] == "bitdelta"
    exported = json.loads(run(tmp_path, "--json", "export", "--entry", "audio", tmp_path / "out"))
    assert exported["codec"] == "bitdelta" and exported["version"] is None
    assert same(tensors(tmp_path / "out"), reference(family, "audio"))


def test_cli_a_bad_codec_is_bad_usage_with_the_choices_named(family, tmp_path):
    out = run(tmp_path, "register", family / "audio", "--name", "audio", "--modality", "audio", "--codec", "zip",
              code=2)
    assert "'zip' is not a codec" in out and "lossless" in out and "bitdelta" in out
    assert "Traceback" not in out and not (tmp_path / "store").exists()  # refused before any store is opened
    out = run(tmp_path, "register", family / "audio", "--name", "audio", "--modality", "audio", "--codec",
              "bitdelta", "--reference", code=2)
    assert "choose one" in out
