"""A full disk: a file-size limit (RLIMIT_FSIZE) and, where it can be mounted, a small tmpfs.

The command fails with a message and exit 1 (never a traceback, never killed by SIGXFSZ), and the
store is as it was: audit clean, the same versions and entries, and earlier exports unchanged.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import uuid

import pytest

from harness import assert_clean_failure, log_trial, mmer, pick, store_state, tree_digest


def limit_file_size(nbytes: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return preexec


def ops(t):
    return {"register": ["register", t["speech"], "--name", "speech", "--modality", "speech"],
            "expand": ["expand", "--density", "0.3"],
            "export": ["export", "--entry", "vision", t["dir"] / "new-export"],
            "export-replace": ["export", "--text", "--force", t["exports"] / "text"]}


@pytest.mark.parametrize("op", pick(["register", "export-replace"], ["register", "expand", "export", "export-replace"]))
def test_file_size_limit_is_a_message_and_the_store_is_unchanged(trial, op):
    before = store_state(trial["store"])
    text = tree_digest(trial["exports"] / "text")
    result = mmer(trial["store"], *ops(trial)[op], preexec_fn=limit_file_size(2048))
    assert_clean_failure(result, codes=(1,))
    assert "larger than allowed" in result.stderr or "disk" in result.stderr, result.stderr
    after = store_state(trial["store"])
    assert after["ok"] and after["versions"] == before["versions"] and after["entries"] == before["entries"]
    assert after["current"] == before["current"]
    assert tree_digest(trial["exports"] / "text") == text
    assert not (trial["dir"] / "new-export").exists()
    log_trial("disk", f"RLIMIT_FSIZE {op}", True)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    size = 4 * 1024 * 1024
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        print(f"tmpfs not available: {res.stderr.strip() or res.stdout.strip()}")
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); RLIMIT_FSIZE covers a full disk")
    yield mnt, size
    subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("op", pick(["expand"], ["register", "expand"]))
def test_a_full_tmpfs_is_a_message_and_the_store_is_unchanged(trial, small_tmpfs, op):
    mnt, size = small_tmpfs
    store = mnt / "store"
    shutil.copytree(trial["store"], store)
    before = store_state(store)
    filler = mnt / "filler"
    used = sum(p.stat().st_size for p in mnt.rglob("*") if p.is_file())
    free = shutil.disk_usage(mnt).free
    with open(filler, "wb") as fh:  # leave about 24 KB: the op starts, then runs out of space
        fh.write(b"\0" * max(0, free - 24 * 1024))
    args = ops(trial)[op]
    result = mmer(store, *args)
    assert_clean_failure(result, codes=(1,))
    assert "disk is full" in result.stderr or "full" in result.stderr, result.stderr
    filler.unlink()
    after = store_state(store)
    assert after["ok"] and after["versions"] == before["versions"] and after["entries"] == before["entries"]
    assert mmer(store, *args).returncode == 0, "with space again the same command succeeds"
    log_trial("disk", f"tmpfs full {op} (store {used} bytes)", True)
