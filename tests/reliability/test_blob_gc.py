"""Smaller blob and gc cases of issue 20: no orphans from "nothing changed", removal beside an unreadable
referenced entry, and `export --force` onto another store."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from harness import log_trial, snapshot_files
from mmer_cl.cli import cli


def run_cli(store, *args):
    return CliRunner().invoke(cli, ["--store", str(store), "--actor", "t", "-q", *map(str, args)])


def clean_failure(result, codes=(1, 2)) -> str:
    assert result.exit_code in codes, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result.output


def test_registering_by_reference_then_by_copy_leaves_no_unreferenced_blobs(family, tmp_path):
    from mmer_cl.store import Store

    with Store.init(tmp_path / "s", family / "base") as s:
        s.register(family / "vision", "vision", "vision", reference=True)
        before = sorted(s.blobs.digests())
        again = s.register(family / "vision", "vision", "vision")  # now by copy
        assert not again.created and again.entry.name == "vision"  # "nothing changed"
        assert sorted(s.blobs.digests()) == before
        assert s.audit().unreferenced == 0
    log_trial("blobs", "register by reference, then by copy: 0 unreferenced", True)


def test_an_unreadable_referenced_entry_is_named_and_can_be_removed_then_the_others(family, tmp_path):
    from mmer_cl.store import Store

    shutil.copytree(family / "vision", tmp_path / "vision")
    store = tmp_path / "s"
    with Store.init(store, family / "base") as s:
        s.register(tmp_path / "vision", "vision", "vision", reference=True)
        s.register(family / "audio", "audio", "audio")
        s.register(family / "video", "video", "video")
        s.expand()
    shutil.rmtree(tmp_path / "vision")
    objects = snapshot_files(store / "objects")

    out = clean_failure(run_cli(store, "remove", "audio"))
    assert "'vision'" in out and "mmer remove vision" in out and "Nothing was changed" in out, out
    assert snapshot_files(store / "objects") == objects
    assert run_cli(store, "remove", "vision").exit_code == 0
    assert run_cli(store, "remove", "audio").exit_code == 0
    with Store.open(store) as s:
        assert [m.entry_name for m in s.version().members] == ["video"]
        assert s.audit().ok
        s.export("vision", tmp_path / "vision-v1", version=1)  # exports never need the source
    log_trial("blobs", "remove beside an unreadable referenced entry: named; it, then the others, removed", True)


@pytest.mark.parametrize("where", ["root", "parent", "inside", "objects"])
def test_export_force_onto_another_store_is_refused(trial, tmp_path, where):
    from mmer_cl.store import Store
    from mmer_cl.checkpoints.export_guard import MARKER_NAME

    other = tmp_path / "area" / "other"
    Store.init(other, trial["family"] / "base", actor="x").close()
    target = {"root": other, "parent": tmp_path / "area", "inside": other / "sub",
              "objects": other / "objects"}[where]
    target.mkdir(exist_ok=True)
    (target / MARKER_NAME).write_text('{"mmer_export": 1}')  # even when it looks like an earlier export
    before = snapshot_files(tmp_path / "area")
    out = clean_failure(run_cli(trial["store"], "export", "--entry", "vision", "--force", target))
    assert "mmer store" in out, out
    assert snapshot_files(tmp_path / "area") == before
    log_trial("inputs", f"export --force onto another store ({where}): refused", True)
