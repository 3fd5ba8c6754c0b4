"""The `mmer` command line, end to end on tiny random models."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

import builders
from mmer_cl.cli import cli


@pytest.fixture
def mmer(tmp_path):
    runner = CliRunner()

    def run(*args, code=0):
        result = runner.invoke(cli, ["--store", str(tmp_path / "store"), "--actor", "ci", "-q", *map(str, args)])
        assert result.exit_code == code, result.output + str(result.exception)
        return result.output

    return run


def test_full_lifecycle(mmer, family, tmp_path):
    assert "initialised" in mmer("init", "--base", family / "base")
    mmer("register", family / "vision", "--name", "vision", "--modality", "vision", "--task", "caption")
    mmer("register", family / "audio", "--name", "audio", "--modality", "audio")
    assert "version 1 (from all task vectors)" in mmer("expand")
    mmer("register", family / "video", "--name", "video", "--modality", "video")
    assert "version 2 (incrementally)" in mmer("expand")

    versions = json.loads(mmer("versions", "--json"))
    assert [v["number"] for v in versions] == [1, 2]
    assert versions[1]["details"]["merge_read"] == ["accumulators of v1", "task vector of video"]
    assert versions[1]["aliases"] == ["current"]

    assert "v2 -> v1" in mmer("rollback", "1")
    mmer("export", "--entry", "vision", tmp_path / "vision")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "vision").eval()
    with torch.no_grad():
        assert torch.isfinite(model(**builders.llava_inputs()).logits).all()
    mmer("export", "--text", "--version", "2", tmp_path / "text")
    assert LlamaForCausalLM.from_pretrained(tmp_path / "text").config.vocab_size == builders.VOCAB

    report = json.loads(mmer("report", "--json", "--ranks", "4,8"))
    assert report["version"] == 1 and len(report["entries"]) == 2
    assert "LoRA rank 8" in mmer("report", "--no-svd", "--ranks", "8")

    assert "ok:" in mmer("audit")
    actions = [e["action"] for e in json.loads(mmer("history", "--json"))]
    assert actions == ["init", "register", "register", "expand", "register", "expand", "rollback", "export", "export"]


def test_audit_names_the_corrupted_blob_and_exits_one(mmer, family, tmp_path):
    mmer("init", "--base", family / "base")
    mmer("register", family / "vision", "--name", "vision", "--modality", "vision")
    mmer("expand")
    objects = sorted((tmp_path / "store" / "objects").rglob("*"))
    victim = next(p for p in objects if p.is_file())
    victim.write_bytes(victim.read_bytes() + b"tampered")
    out = mmer("audit", code=1)
    digest = victim.parent.name + victim.name
    assert f"DAMAGED blob {digest}" in out
    assert "entry vision" in out or "version 1" in out
    assert json.loads(mmer("audit", "--json", code=1))["damaged"][0]["digest"] == digest


def test_bad_input_exits_two_with_advice(mmer, family, tmp_path):
    assert "mmer init" in mmer("versions", code=2)
    mmer("init", "--base", family / "base")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    assert "safe_serialization" in mmer("register", tmp_path / "pickled", "--name", "p", "--modality", "vision",
                                        code=2)
    assert "invalid entry name" in mmer("register", family / "vision", "--name", "../x", "--modality", "v", code=2)
    assert "no entries are registered" in mmer("expand", code=2)
    assert "exactly one of --entry" in mmer("export", tmp_path / "o", code=2)


def test_registering_twice_is_recognised(mmer, family):
    mmer("init", "--base", family / "base")
    mmer("register", family / "vision", "--name", "vision", "--modality", "vision")
    assert "already registered as entry 'vision'" in mmer("register", family / "vision", "--name", "v2",
                                                         "--modality", "vision")


def test_remove_and_gc(mmer, family):
    mmer("init", "--base", family / "base")
    mmer("register", family / "vision", "--name", "vision", "--modality", "vision")
    mmer("register", family / "audio", "--name", "audio", "--modality", "audio")
    mmer("expand")
    assert "version 2 is current" in mmer("remove", "audio")
    assert "(removed)" in mmer("entries", "--all")
    assert "removed 0 blobs" in mmer("gc")


@pytest.mark.parametrize("command", ["init", "register", "expand", "versions", "rollback", "remove", "export",
                                     "report", "audit", "gc", "history", "entries"])
def test_every_command_has_help_with_an_example(command):
    out = CliRunner().invoke(cli, [command, "--help"]).output
    assert "Example" in out and "mmer " in out
