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
    assert versions[1]["details"]["coded_against"] == "v1"
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


def test_registering_twice_is_recognised_and_another_name_for_the_same_weights_refused(mmer, family):
    mmer("init", "--base", family / "base")
    mmer("register", family / "vision", "--name", "vision", "--modality", "vision")
    assert "already registered as entry 'vision'; nothing changed" in mmer("register", family / "vision", "--name",
                                                                          "vision", "--modality", "vision")
    out = mmer("register", family / "vision", "--name", "v2", "--modality", "vision", code=2)
    assert "already registered as entry 'vision'" in out and "use that name" in out
    assert [e["name"] for e in json.loads(mmer("entries", "--json"))] == ["vision"]


def test_remove_and_gc(mmer, family):
    mmer("init", "--base", family / "base")
    mmer("register", family / "vision", "--name", "vision", "--modality", "vision")
    mmer("register", family / "audio", "--name", "audio", "--modality", "audio")
    mmer("expand")
    assert "version 2 is current" in mmer("remove", "audio")
    assert "(removed)" in mmer("entries", "--all")
    assert "removed 0 blobs" in mmer("gc")


@pytest.mark.parametrize("command", ["init", "register", "expand", "versions", "rollback", "remove", "export",
                                     "report", "audit", "gc", "history", "entries", "alias", "tag", "describe",
                                     "show", "diff"])
def test_every_command_has_help_with_an_example(command):
    out = CliRunner().invoke(cli, [command, "--help"]).output
    assert "Example" in out and "mmer " in out


def test_global_options_before_or_after_the_subcommand(family, tmp_path):
    runner = CliRunner()
    store = str(tmp_path / "store")
    r = runner.invoke(cli, ["init", "--base", str(family / "base"), "--store", store, "-q", "--actor", "ana"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["register", str(family / "vision"), "--name", "vision", "--modality", "vision",
                            f"--store={store}", "-q", "--actor", "ana"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["--store", store, "entries", "--json"])
    assert json.loads(r.output)[0]["name"] == "vision"
    r = runner.invoke(cli, ["--json", "--store", store, "entries"])
    assert json.loads(r.output)[0]["created_by"] == "ana"


def test_init_twice_with_another_name_is_refused_and_the_same_init_is_recognised(mmer, family):
    mmer("init", "--base", family / "base")
    assert "already holds this base" in mmer("init", "--base", family / "base")
    out = mmer("init", "--base", family / "base", "--name", "llama", code=2)
    assert "already holds this base model" in out and "--store" in out
    mmer("register", family / "vision", "--name", "vision", "--modality", "vision")  # no --base needed


def test_registry_conventions_from_the_command_line(mmer, family, tmp_path):
    mmer("init", "--base", family / "base")
    mmer("register", family / "vision", "--name", "vision", "--modality", "vision", "--tag", "owner=ana")
    mmer("register", family / "audio", "--name", "audio", "--modality", "audio")
    mmer("expand", "--density", "0.5", "--description", "first", "--tag", "stage=dev")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("density: 0.5\nlambda: 0.8\nlambda_per_entry: {audio: 0.6}\nmembers: [vision, audio]\n")
    assert "version 2" in mmer("expand", "--config", recipe)
    assert "current: v2 -> v1" in mmer("rollback", "v1")
    assert "current: v1 -> v2" in mmer("rollback", "2")
    assert "production: none -> v1" in mmer("alias", "set", "production", "v1")
    assert "production" in mmer("alias") and "v1" in mmer("alias")
    shown = mmer("show", "v2")
    assert "lambda_per_entry: {audio: 0.6}" in shown and "vision" in shown and "mask" in shown
    assert json.loads(mmer("show", "production", "--json"))["tags"] == {"stage": "dev"}
    d = mmer("diff", "v1", "v2")
    assert "lam 1.0 -> 0.8" in d and "members added: none" in d
    assert "stage=prod" in mmer("tag", "--version", "production", "stage=prod")
    mmer("describe", "--entry", "vision", "the digits one")
    assert "registered 'vision' revision 2" in mmer("register", family / "video", "--name", "vision",
                                                   "--modality", "vision", "--update")
    listing = mmer("entries", "--all")
    assert "vision@1" in listing and "(superseded)" in listing
    assert "production: v1 -> none (removed)" in mmer("alias", "rm", "production")
    assert "cannot be removed" in mmer("alias", "rm", "current", code=2)
    assert "no version or alias 'nope'" in mmer("show", "nope", code=2)
    actions = [e["action"] for e in json.loads(mmer("history", "--json"))]
    assert actions.count("alias") == 2 and "tag" in actions and "describe" in actions and "update" in actions


def test_listings_widen_columns_for_long_names(mmer, family):
    mmer("init", "--base", family / "base")
    long = "a-very-long-entry-name-that-would-run-into-the-next-column"
    mmer("register", family / "vision", "--name", long, "--modality", "vision")
    mmer("register", family / "audio", "--name", "x", "--modality", "audio")
    lines = mmer("entries").splitlines()
    header, first, second = lines[0], lines[1], lines[2]
    col = header.index("rev")
    assert first.startswith(long + " ") and second[col - 2:col] == "  " and first[col - 2:col] == "  "


def test_help_and_version_load_no_torch():
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from mmer_cl.cli import cli; "
            "r = CliRunner().invoke(cli, ['--help']); assert 'Typical session' in r.output; "
            "r = CliRunner().invoke(cli, ['--version']); assert 'mmer-cl' in r.output; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_the_process_ends_without_teardown_yet_keeps_its_output_exit_code_and_a_clean_store(family, tmp_path):
    import subprocess
    import sys

    def mmer_process(*args):
        command = [sys.executable, "-m", "mmer_cl.cli", "--store", str(tmp_path / "store"), *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True)

    done = mmer_process("init", "--base", family / "base")
    assert done.returncode == 0 and "initialised" in done.stdout  # piped output is flushed before the exit
    listed = mmer_process("versions", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    failed = mmer_process("export", "--entry", "nobody", tmp_path / "out")
    assert failed.returncode not in (0, None) and failed.stderr.startswith("error: no current version")
    assert mmer_process("no-such-command").returncode == 2
    leftovers = [p.name for p in (tmp_path / "store").iterdir() if p.name.endswith(("-wal", "-shm"))]
    assert leftovers == []  # each command closed its registry, so SQLite folded and removed its log


def test_remove_refuses_to_take_in_a_pending_update_and_says_to_expand_first(mmer, family):
    mmer("init", "--base", family / "base")
    mmer("register", family / "vision", "--name", "vision", "--modality", "vision")
    mmer("register", family / "audio", "--name", "audio", "--modality", "audio")
    mmer("expand")
    mmer("register", family / "video", "--name", "vision", "--update")  # pending until the next expand
    out = mmer("remove", "audio", code=2)
    assert "vision revision 2" in out and "`mmer expand` first" in out
    assert [v["number"] for v in json.loads(mmer("versions", "--json"))] == [1]
    assert "audio" in [e["name"] for e in json.loads(mmer("entries", "--json"))]
    mmer("expand")
    out = mmer("remove", "audio")
    assert "removed 'audio'; version 3 is current: vision r2" in out
    assert "vision r1 -> r2" not in mmer("diff", "v2", "v3")


def test_register_update_keeps_modality_and_task_unless_given(mmer, family):
    mmer("init", "--base", family / "base")
    mmer("register", family / "vision", "--name", "vision", "--modality", "vision", "--task", "caption")
    assert "registered 'vision' revision 2 (vision/caption)" in mmer("register", family / "video", "--name",
                                                                    "vision", "--update")
    assert "(vision/vqa)" in mmer("register", family / "audio", "--name", "vision", "--update", "--task", "vqa")
    entry = json.loads(mmer("entries", "--json"))[0]
    assert (entry["revision"], entry["modality"], entry["task"]) == (3, "vision", "vqa")
    assert "no entry named 'nobody' to update" in mmer("register", family / "audio", "--name", "nobody", "--update",
                                                        code=2)
    assert "--modality" in mmer("register", family / "audio", "--name", "audio", code=2)


def test_a_taken_name_fails_before_the_checkpoint_is_read(mmer, family, tmp_path):
    mmer("init", "--base", family / "base")
    mmer("register", family / "vision", "--name", "vision", "--modality", "vision")
    (tmp_path / "not-a-checkpoint").mkdir()  # reading it would fail with another message
    out = mmer("register", tmp_path / "not-a-checkpoint", "--name", "vision", "--modality", "vision", code=2)
    assert "an entry named 'vision' already exists" in out and "--update" in out


@pytest.mark.parametrize("args,message", [
    (["register", "CKPT", "--name", "../x", "--modality", "v"], "invalid entry name"),
    (["register", "CKPT", "--name", "x", "--modality", "a b"], "invalid modality"),
    (["register", "CKPT", "--name", "x", "--modality", "v", "--tag", "novalue"], "KEY=VALUE"),
    (["register", "CKPT", "--name", "x", "--modality", "v", "--max-change", "0"], "--max-change"),
    (["expand", "--density", "2"], "density must be in (0, 1]"),
    (["expand", "--lambda", "-1"], "lambda must be >= 0"),
    (["expand", "--members", "a,../b"], "invalid member name"),
    (["export", "--entry", "../x", "OUT"], "invalid entry name"),
    (["export", "--entry", "x", "--max-shard-size", "lots", "OUT"], "cannot read size"),
    (["remove", "../x"], "invalid entry name"),
])
def test_arguments_are_checked_before_any_store_is_opened(family, tmp_path, args, message):
    """The store does not exist: a message about it would mean the store was opened first."""
    args = [str(family / "vision") if a == "CKPT" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = CliRunner().invoke(cli, ["--store", str(tmp_path / "no-store"), "-q", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "no-store").exists()


def test_messages_name_the_right_command(mmer, family):
    mmer("init", "--base", family / "base")
    out = mmer("tag", "v1.0", "v2", code=2)
    assert "mmer alias set v1.0 v2" in out and "--tag" not in out
    assert "mmer history" in mmer("log", code=2)
    assert "requires an argument" in CliRunner().invoke(cli, ["versions", "--store"]).output
    out = mmer("register", "some-org/some-model", "--name", "x", "--modality", "text", code=2)
    assert "hf download some-org/some-model" in out and "never downloads" in out


def test_a_hub_id_is_read_from_the_local_hugging_face_cache(mmer, family, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--some-org--llava-vision" / "snapshots" / ("0" * 40)
    shutil.copytree(family / "vision", snapshot)
    (cache / "models--some-org--llava-vision" / "refs").mkdir()
    (cache / "models--some-org--llava-vision" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mmer("init", "--base", family / "base")
    assert "registered 'vision'" in mmer("register", "some-org/llava-vision", "--name", "vision", "--modality",
                                         "vision")


def test_version_shows_the_package_and_the_store_format():
    from mmer_cl import __version__
    from registry import SCHEMA_VERSION

    out = CliRunner().invoke(cli, ["--version"]).output
    assert f"mmer (mmer-cl) {__version__}" in out and f"store format {SCHEMA_VERSION}" in out


def test_the_release_is_one_version_everywhere():
    import tomllib
    from pathlib import Path

    from mmer_cl import __version__

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__ == "0.3.0"
    assert project["license"] == "Apache-2.0" and "Apache License" in (root / "LICENSE").read_text()
    assert f"## {__version__}" in (root / "CHANGELOG.md").read_text()
