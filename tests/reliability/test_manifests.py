"""Damaged registry rows: manifests keep gc from deleting live data, and audit names the damage.

Rows of every table are deleted or edited with plain SQL (foreign keys off), as a careless hand, a bad
migration script or a half-restored backup would. Then `mmer audit` exits 1 naming what differs from the
manifests, `mmer gc` refuses with the restore advice (or, where the damage cannot lose data, runs), and
in every case no blob the intact registry reached is gone: restoring the registry backup taken before
the damage gives back a store that audits clean and exports bit for bit as before.
"""

from __future__ import annotations

import shutil
import sqlite3

import pytest
from click.testing import CliRunner

from harness import FULL, log_trial, pick, tree_digest
from mmer_cl.cli import cli


def run_cli(store, *args):
    return CliRunner().invoke(cli, ["--store", str(store), "--actor", "t", "-q", *map(str, args)])


def sql(db, *statements: str) -> None:
    con = sqlite3.connect(db)
    con.execute("PRAGMA foreign_keys=OFF")
    for st in statements:
        con.execute(st)
    con.commit()
    con.close()


def flip_hex(column: str, table: str, where: str = "1=1") -> str:
    """SQL editing one hex digit (the first) of ``column`` in one row of ``table``."""
    return (f"UPDATE {table} SET {column} = (CASE substr({column}, 1, 1) WHEN 'a' THEN 'b' ELSE 'a' END) "
            f"|| substr({column}, 2) WHERE id = (SELECT min(id) FROM {table} WHERE {where})")


AUDIO = "(SELECT id FROM entries WHERE name = 'audio')"
V2 = "(SELECT id FROM versions WHERE number = 2)"
# name -> (SQL, whether audit must find damage)
DAMAGE = {
    "version_blobs: 5 rows deleted": (["DELETE FROM version_blobs WHERE id IN (SELECT id FROM version_blobs LIMIT 5)"],
                                      True),
    "entry_blobs: one entry's rows deleted": ([f"DELETE FROM entry_blobs WHERE entry_id = {AUDIO}"], True),
    "entry_blobs: one hex digit of a digest": ([flip_hex("digest", "entry_blobs", "role = 'own'")], True),
    "version_blobs: one hex digit of a digest": ([flip_hex("digest", "version_blobs", "role = 'merged'")], True),
    "version_blobs: a mask moved to another entry": (
        [f"UPDATE version_blobs SET entry_id = {AUDIO} WHERE id = (SELECT min(id) FROM version_blobs "
         f"WHERE role = 'mask' AND entry_id != {AUDIO})"], True),
    "versions: version 1's row deleted": (["DELETE FROM versions WHERE number = 1"], True),
    "versions: the latest version and all its rows deleted": (
        [f"DELETE FROM version_blobs WHERE version_id = {V2}", f"DELETE FROM version_members WHERE version_id = {V2}",
         "UPDATE aliases SET version_id = (SELECT id FROM versions WHERE number = 1)",
         "DELETE FROM versions WHERE number = 2"], True),
    "versions: one hex digit of a manifest digest": ([flip_hex("manifest", "versions")], True),
    "versions: manifest digest emptied": (["UPDATE versions SET manifest = NULL"], True),
    "versions: params edited": (["UPDATE versions SET params = replace(params, '\"density\"', '\"densty\"')"], True),
    "version_members: rows deleted": ([f"DELETE FROM version_members WHERE version_id = {V2}"], True),
    "version_members: a scale edited": (["UPDATE version_members SET scale = scale + 1"], True),
    "entries: a row deleted": (["DELETE FROM entries WHERE name = 'video'"], True),
    "entries: a fingerprint edited": ([flip_hex("fingerprint", "entries")], True),
    "entries: manifest digests emptied": (["UPDATE entries SET manifest = NULL"], True),
    "entries: a keymap edited": (["UPDATE entries SET keymap = '{}' WHERE name = 'vision'"], True),
    "aliases: current points at a missing version": (["UPDATE aliases SET version_id = 999"], True),
    "base_models: the base deleted": (["DELETE FROM base_models"], True),
    "versions: a number edited": (["UPDATE versions SET number = 7 WHERE number = 1"], True),
    "version_members: an entry id edited": ([f"UPDATE version_members SET entry_id = {AUDIO} WHERE id = "
                                             "(SELECT min(id) FROM version_members)"], True),
    "entries: a revision edited": (["UPDATE entries SET revision = 3 WHERE name = 'vision'"], True),
    "entries: marked as registered by reference": (
        ["UPDATE entries SET stats = replace(stats, '\"referenced\": false', '\"referenced\": true')"], True),
    "base_tensors: a sha256 edited": ([flip_hex("sha256", "base_tensors")], True),
    "base_tensors: a row deleted": (["DELETE FROM base_tensors WHERE id = (SELECT max(id) FROM base_tensors)"],
                                    True),
    "events: a logged manifest edited (triggers dropped first)": (
        ["DROP TRIGGER events_no_update", "UPDATE events SET details = replace(details, '\"manifest\": \"', "
         "'\"manifest\": \"0') WHERE action = 'expand'"], True),
    "meta: the store id deleted": (["DELETE FROM meta WHERE key = 'store_id'"], False),
    "trims: all deleted (a cache)": (["DELETE FROM trims"], False),
    "tags: edited and deleted": (["DELETE FROM tags"], False),
    "meta: the manifests flag deleted": (["DELETE FROM meta WHERE key = 'manifests'"], False),
    "events: deleted (triggers dropped first)": (["DROP TRIGGER events_no_delete", "DELETE FROM events"], False),
    "everything at once: blob rows of every table deleted": (
        ["DELETE FROM entry_blobs", "DELETE FROM version_blobs"], True),
}
REDUCED = ["version_blobs: 5 rows deleted", "entry_blobs: one entry's rows deleted",
           "entry_blobs: one hex digit of a digest", "versions: the latest version and all its rows deleted",
           "entries: manifest digests emptied", "trims: all deleted (a cache)"]
EXPORTS = [("vision", 1), ("audio", 1), ("video", 2), ("vision", 2)]


@pytest.fixture(scope="module")
def exported(prepared, tmp_path_factory):
    """What the intact store exports (tree digests), and every digest its registry reaches."""
    from harness import copy_tree
    from mmer_cl.store import Store

    work = copy_tree(prepared["template"], tmp_path_factory.mktemp("manifests") / "t")
    with Store.open(work / "store") as s:
        digests = {(n, v): tree_digest(s.export(n, work / f"{n}-{v}", version=v)) for n, v in EXPORTS}
        live = set(s.registry.blob_owners())
    return {"digests": digests, "live": live}


@pytest.mark.parametrize("case", pick(REDUCED, list(DAMAGE)))
def test_damaged_rows_never_make_gc_delete_live_blobs_and_a_backup_works_again(trial, exported, tmp_path, case):
    store, db = trial["store"], trial["store"] / "registry.db"
    statements, is_damage = DAMAGE[case]
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(db, backup / "registry.db")  # the backup, taken while the store is closed
    assert exported["live"] <= set(p.parent.name + p.name for p in (store / "objects").glob("??/*"))
    sql(db, *statements)

    audit = run_cli(store, "audit")
    gc = run_cli(store, "gc")
    assert "Traceback" not in audit.output + gc.output
    if is_damage:
        assert audit.exit_code == 1, audit.output
        assert "DAMAGE" in audit.output or "PROBLEM" in audit.output, audit.output
        assert gc.exit_code == 1 and "restore" in gc.output.lower(), gc.output
    else:
        assert audit.exit_code == 0 and gc.exit_code == 0, (audit.output, gc.output)
    present = {p.parent.name + p.name for p in (store / "objects").glob("??/*")}
    assert exported["live"] <= present, f"{case}: gc deleted {len(exported['live'] - present)} live blobs"

    for side in ("registry.db-wal", "registry.db-shm"):
        (store / side).unlink(missing_ok=True)
    shutil.copy(backup / "registry.db", db)  # restore the backup
    assert run_cli(store, "audit").exit_code == 0
    chosen = EXPORTS if FULL else EXPORTS[1:3]
    for name, version in chosen:
        out = tmp_path / f"{name}-{version}"
        result = run_cli(store, "export", "--entry", name, "--version", version, out)
        assert result.exit_code == 0, result.output
        assert tree_digest(out) == exported["digests"][(name, version)], (case, name, version)
    log_trial("registry-rows", f"{case}: audit {audit.exit_code}, gc {gc.exit_code}, 0 live lost, backup exports "
              f"{len(chosen)} bit for bit", True)


def test_the_issues_cases_audit_exit_1_names_the_damage_and_gc_refuses(trial):
    """The three reproductions of issue 20, item 1, through the CLI."""
    store, db = trial["store"], trial["store"] / "registry.db"
    good = db.read_bytes()
    objects = sorted(p.name for p in (store / "objects").glob("??/*"))

    sql(db, "DELETE FROM version_blobs WHERE id IN (SELECT id FROM version_blobs LIMIT 5)")
    audit = run_cli(store, "audit")
    assert audit.exit_code == 1 and "5 blob row(s) of its manifest are missing" in audit.output, audit.output
    gc = run_cli(store, "gc")
    assert gc.exit_code == 1 and "refusing to run gc" in gc.output and "backup" in gc.output, gc.output
    assert sorted(p.name for p in (store / "objects").glob("??/*")) == objects

    db.write_bytes(good)
    for side in ("registry.db-wal", "registry.db-shm"):
        (store / side).unlink(missing_ok=True)
    sql(db, f"DELETE FROM entry_blobs WHERE entry_id = {AUDIO}")
    audit = run_cli(store, "audit")
    assert audit.exit_code == 1 and "entry audio r1" in audit.output, audit.output
    assert run_cli(store, "gc").exit_code == 1

    db.write_bytes(good)
    for side in ("registry.db-wal", "registry.db-shm"):
        (store / side).unlink(missing_ok=True)
    sql(db, flip_hex("digest", "entry_blobs"))
    audit = run_cli(store, "audit")
    assert audit.exit_code == 1 and "MISSING" in audit.output and "not in its manifest" in audit.output
    assert run_cli(store, "gc").exit_code == 1
    assert sorted(p.name for p in (store / "objects").glob("??/*")) == objects
    log_trial("registry-rows", "issue 20 reproductions: audit 1, gc refused, nothing deleted", True)
