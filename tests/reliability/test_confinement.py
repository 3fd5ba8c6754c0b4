"""A checkpoint is only what is inside its directory (issue 20, item 2).

Links out of the directory, FIFOs, sockets, device files are refused by name, before anything is read;
a link that stays inside is followed; non-weight files off the allow-list are skipped with a warning and
never reach the store or an export. The same holds for LoRA adapters and for `register --reference`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import assert_clean_failure, log_trial, mmer, snapshot_files
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.cli import cli
from mmer_cl.checkpoints.confinement import allowed_name, list_aux_files, read_confined
from mmer_cl.errors import CheckpointError


def run(store, *args):
    return CliRunner().invoke(cli, ["--store", str(store), "--actor", "t", "-q", *map(str, args)])


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def exported_names(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


def test_the_issue_case_links_to_procfs_and_the_password_file_are_refused_by_name(trial, tmp_path):
    ckpt = copy_checkpoint(trial["speech"], tmp_path / "ck")
    os.symlink("/proc/self/environ", ckpt / "env.txt")
    os.symlink("/etc/passwd", ckpt / "notes.txt")
    before = snapshot_files(trial["store"])
    result = mmer(trial["store"], "register", ckpt, "--name", "leaky", "--modality", "speech",
                  env={"AWS_SECRET_ACCESS_KEY": "sekrit-from-env"})
    assert_clean_failure(result, codes=(2,))
    out = result.stdout + result.stderr
    assert "env.txt" in out and "/proc/self/environ" in out and "outside the checkpoint" in out, out
    assert "sekrit-from-env" not in out
    assert snapshot_files(trial["store"]) == before  # no blob, no row
    os.unlink(ckpt / "env.txt")
    refused = run(trial["store"], "register", ckpt, "--name", "leaky", "--modality", "speech")
    assert refused.exit_code == 2 and "notes.txt" in refused.output and "/etc/passwd" in refused.output
    log_trial("confinement", "symlinks to /proc/self/environ and /etc/passwd", True)


def test_no_file_from_outside_reaches_the_store_or_an_export(trial, tmp_path):
    """The issue's end-to-end path: register, expand, export; nothing of the environment or passwd in any
    blob or exported file, even once the bad links are removed and the checkpoint registered."""
    ckpt = copy_checkpoint(trial["speech"], tmp_path / "ck")
    os.symlink("/etc/passwd", ckpt / "notes.txt")
    assert run(trial["store"], "register", ckpt, "--name", "sp", "--modality", "speech").exit_code == 2
    os.unlink(ckpt / "notes.txt")
    (ckpt / "notes.txt").write_text("my own notes\n")  # a regular file inside: allowed (*.txt)
    assert run(trial["store"], "register", ckpt, "--name", "sp", "--modality", "speech").exit_code == 0
    assert run(trial["store"], "expand").exit_code == 0
    out = tmp_path / "out"
    assert run(trial["store"], "export", "--entry", "sp", out).exit_code == 0
    assert (out / "notes.txt").read_text() == "my own notes\n"
    passwd = Path("/etc/passwd").read_bytes()
    for blob in (trial["store"] / "objects").rglob("*"):
        if blob.is_file():
            assert passwd not in blob.read_bytes()
    log_trial("confinement", "register+expand+export holds nothing from outside", True)


def test_a_link_that_stays_inside_the_directory_is_followed(trial, tmp_path):
    ckpt = copy_checkpoint(trial["speech"], tmp_path / "ck")
    (ckpt / "extra").mkdir()
    (ckpt / "extra" / "chat.jinja").write_text("{{ messages }}")
    os.symlink("extra/chat.jinja", ckpt / "chat_template.jinja")
    (ckpt / "generation_config.json").rename(ckpt / "extra" / "gen.json") \
        if (ckpt / "generation_config.json").exists() else (ckpt / "extra" / "gen.json").write_text("{}")
    os.symlink(ckpt / "extra" / "gen.json", ckpt / "generation_config.json")  # absolute, still inside
    assert run(trial["store"], "register", ckpt, "--name", "sp", "--modality", "speech").exit_code == 0
    assert run(trial["store"], "expand").exit_code == 0
    out = tmp_path / "out"
    assert run(trial["store"], "export", "--entry", "sp", out).exit_code == 0
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (out / "generation_config.json").read_bytes() == (ckpt / "extra" / "gen.json").read_bytes()
    assert not (out / "extra").exists()
    log_trial("confinement", "symlink inside the directory followed", True)


def test_a_link_into_a_sibling_directory_is_refused(trial, tmp_path):
    ckpt = copy_checkpoint(trial["speech"], tmp_path / "ck")
    (tmp_path / "ck-other").mkdir()
    (tmp_path / "ck-other" / "vocab.txt").write_text("a\nb\n")
    os.symlink("../ck-other/vocab.txt", ckpt / "vocab.txt")
    result = run(trial["store"], "register", ckpt, "--name", "sp", "--modality", "speech")
    assert result.exit_code == 2 and "vocab.txt" in result.output and "outside" in result.output
    log_trial("confinement", "relative symlink to a sibling directory", True)


def test_files_off_the_allow_list_are_skipped_with_a_warning(trial, tmp_path):
    ckpt = copy_checkpoint(trial["speech"], tmp_path / "ck")
    (ckpt / "secrets.env").write_text("TOKEN=abc")
    (ckpt / "run.sh").write_text("#!/bin/sh\n")
    (ckpt / "tokenizer.model").write_bytes(b"\x00spm")
    (ckpt / "qwen.tiktoken").write_text("YQ== 0\n")
    (ckpt / "merges.txt").write_text("#version: 0.2\n")
    (ckpt / "README.md").write_text("# card\n")
    (ckpt / "LICENSE").write_text("MIT\n")
    (ckpt / "modeling_custom.py").write_text("# custom code\n")
    result = run(trial["store"], "register", ckpt, "--name", "sp", "--modality", "speech")
    assert result.exit_code == 0, result.output
    assert "warning: not copied" in result.output and "secrets.env" in result.output and "run.sh" in result.output
    assert run(trial["store"], "expand").exit_code == 0
    out = tmp_path / "out"
    assert run(trial["store"], "export", "--entry", "sp", out).exit_code == 0
    names = exported_names(out)
    assert {"tokenizer.model", "qwen.tiktoken", "merges.txt", "LICENSE", "modeling_custom.py",
            "config.json"} <= names
    assert not {"secrets.env", "run.sh"} & names
    log_trial("confinement", "allow-list: known files copied, others skipped with a warning", True)


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)


def _make_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    return s


@pytest.mark.parametrize("name", ["tokenizer.json", "model.safetensors.index.json", "shard", "notes.txt"])
def test_a_fifo_is_refused_and_never_blocks(trial, tmp_path, name):
    ckpt = copy_checkpoint(trial["speech"], tmp_path / "ck")
    if name == "shard":
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        name = sorted(set(index["weight_map"].values()))[0]
    target = ckpt / name
    if target.exists():
        target.unlink()
    _make_fifo(target)
    result = mmer(trial["store"], "register", ckpt, "--name", "sp", "--modality", "speech", timeout=120)
    assert_clean_failure(result, codes=(2,))
    out = result.stdout + result.stderr
    assert name in out and "FIFO" in out, out
    log_trial("confinement", f"FIFO as {name} refused without blocking", True)


def test_a_socket_and_a_device_file_are_refused(trial, tmp_path):
    ckpt = copy_checkpoint(trial["speech"], tmp_path / "ck")
    sock = _make_socket(ckpt / "processor_config.json")
    try:
        result = run(trial["store"], "register", ckpt, "--name", "sp", "--modality", "speech")
        assert result.exit_code == 2 and "processor_config.json" in result.output and "socket" in result.output
    finally:
        sock.close()
    os.unlink(ckpt / "processor_config.json")
    os.symlink("/dev/zero", ckpt / "special_tokens_map.json")
    result = run(trial["store"], "register", ckpt, "--name", "sp", "--modality", "speech")
    assert result.exit_code == 2 and "special_tokens_map.json" in result.output and "outside" in result.output
    os.unlink(ckpt / "special_tokens_map.json")
    try:  # a device node (what a hard link to a device file is) inside the directory itself
        os.mknod(ckpt / "added_tokens.json", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here (needs CAP_MKNOD)")
    result = run(trial["store"], "register", ckpt, "--name", "sp", "--modality", "speech")
    assert result.exit_code == 2 and "added_tokens.json" in result.output and "device file" in result.output
    log_trial("confinement", "socket, link to /dev/zero, device node", True)


def test_a_shard_linked_from_outside_is_refused(trial, tmp_path):
    ckpt = copy_checkpoint(trial["speech"], tmp_path / "ck")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "elsewhere").mkdir()
    (ckpt / shard).rename(tmp_path / "elsewhere" / shard)
    os.symlink(tmp_path / "elsewhere" / shard, ckpt / shard)
    result = run(trial["store"], "register", ckpt, "--name", "sp", "--modality", "speech")
    assert result.exit_code == 2 and shard in result.output and "outside" in result.output
    log_trial("confinement", "shard symlinked from outside", True)


def test_the_hugging_face_cache_layout_is_accepted(trial, tmp_path):
    """models--X/snapshots/REV/* are links into models--X/blobs/: that repository's own files."""
    repo = tmp_path / "hub" / "models--org--speech"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(trial["speech"].iterdir()):
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        os.symlink(Path("../../blobs") / blob.name, snap / f.name)
    assert Checkpoint(snap).aux_files()
    assert run(trial["store"], "register", snap, "--name", "hub", "--modality", "speech").exit_code == 0
    log_trial("confinement", "HF cache snapshot accepted", True)


def test_register_by_reference_follows_the_same_rule(trial, tmp_path):
    ckpt = copy_checkpoint(trial["speech"], tmp_path / "ck")
    os.symlink("/etc/passwd", ckpt / "notes.txt")
    result = run(trial["store"], "register", ckpt, "--name", "ref", "--modality", "speech", "--reference")
    assert result.exit_code == 2 and "notes.txt" in result.output
    os.unlink(ckpt / "notes.txt")
    assert run(trial["store"], "register", ckpt, "--name", "ref", "--modality", "speech",
               "--reference").exit_code == 0
    # later reads of the referenced checkpoint are confined too: a shard swapped for a link out is refused
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "elsewhere").mkdir()
    (ckpt / shard).rename(tmp_path / "elsewhere" / shard)
    os.symlink(tmp_path / "elsewhere" / shard, ckpt / shard)
    result = run(trial["store"], "expand")
    assert result.exit_code in (1, 2) and shard in result.output and "outside" in result.output, result.output
    assert "Traceback" not in result.output
    log_trial("confinement", "register --reference confined at register and at expand", True)


def test_lora_adapter_files_are_confined(tmp_path):
    peft = pytest.importorskip("peft", reason="the peft extra is not installed")
    import builders
    from mmer_cl.store import Store

    base = builders.save_base(tmp_path / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    os.symlink("/etc/passwd", tmp_path / "adapter" / "tokenizer_config.json")
    (tmp_path / "adapter" / "wandb.log").write_text("x")
    with Store.init(tmp_path / "store", tmp_path / "base", actor="t") as store:
        with pytest.raises(CheckpointError, match="tokenizer_config.json.*outside"):
            store.register(tmp_path / "adapter", "chat", "text")
        os.unlink(tmp_path / "adapter" / "tokenizer_config.json")
        os.symlink("/etc/passwd", tmp_path / "adapter" / "adapter_config.json.tmp")  # off the list: skipped
        result = store.register(tmp_path / "adapter", "chat", "text")
        assert result.created
        aux = {r.key for r in store.registry.entry_blobs(result.entry.id, "aux")}
        assert "wandb.log" not in aux and "adapter_config.json.tmp" not in aux
    log_trial("confinement", "LoRA adapter directory confined", True)


def test_read_confined_never_blocks_on_a_fifo_swapped_in_after_listing(tmp_path):
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    listed = list_aux_files(ckpt).files
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_try_read(ckpt, listed[0])), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert outcome and "FIFO" in outcome[0]


def _try_read(directory: Path, path: Path) -> str:
    try:
        read_confined(directory, path)
    except CheckpointError as exc:
        return str(exc)
    return "read"


def test_the_allow_list():
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "preprocessor_config.json", "chat_template.jinja", "tokenizer.model",
                 "vocab.txt", "merges.txt", "qwen.tiktoken", "README.md", "LICENSE", "spiece.model",
                 "configuration_x.py", "modeling_x.py", "tokenization_x.py"):
        assert allowed_name(name), name
    for name in ("secrets.env", "id_rsa", "run.sh", "setup.py", "train.log", "optimizer.pt.bak", "x.yaml"):
        assert not allowed_name(name), name


def test_the_issue_case_in_a_fresh_process_exits_quickly_with_a_message(trial, tmp_path):
    """The same as the first test, through `python -m mmer_cl.cli`, with a FIFO besides: no hang."""
    ckpt = copy_checkpoint(trial["speech"], tmp_path / "ck")
    os.symlink("/proc/self/environ", ckpt / "env.txt")
    os.mkfifo(ckpt / "pipe.json")
    result = subprocess.run([sys.executable, "-m", "mmer_cl.cli", "--store", str(trial["store"]), "-q",
                             "register", str(ckpt), "--name", "x", "--modality", "speech"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert_clean_failure(result, codes=(2,))
    assert "env.txt" in result.stdout + result.stderr
