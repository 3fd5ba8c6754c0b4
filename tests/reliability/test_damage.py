"""Damaged data: corrupted, truncated and deleted blobs; a damaged, empty or foreign registry.

Audit finds every damaged blob and names what it breaks down to the tensor. A damaged registry is
refused by every command with a message that says how to restore it, and nothing is written,
recreated or deleted: the objects and the registry file stay byte for byte as they were.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3

import pytest
from click.testing import CliRunner

from harness import FULL, log_trial, pick, snapshot_files
from mmer_cl.cli import cli


def run_cli(store, *args, cwd=None):
    result = CliRunner().invoke(cli, ["--store", str(store), "--actor", "t", "-q", *map(str, args)])
    return result


def clean_failure(result, codes=(1, 2)):
    assert result.exit_code in codes, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no exception escaped
    assert "Traceback" not in result.output
    return result.output


def damage_blob(path, how: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if how == "flip":
        i = rng.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:])
    elif how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif how == "delete":
        path.unlink()
    elif how == "zero":
        path.write_bytes(b"")


@pytest.mark.parametrize("seed", pick([0], list(range(8))))
def test_audit_finds_every_damaged_blob_and_names_its_owners_down_to_the_tensor(trial, seed):
    from mmer_cl.store import Store

    rng = random.Random(seed)
    with Store.open(trial["store"]) as s:
        owners = s.registry.blob_owners(detailed=True)
        by_role = {}
        for digest, who in owners.items():
            for o in who:
                by_role.setdefault(o.split(",")[0].split(" ", 2)[2].split(" ")[0], []).append(digest)
        digests = sorted({rng.choice(sorted(v)) for v in by_role.values()})  # one blob of every role
        digests += rng.sample(sorted(owners), 12 if FULL else 2)
        digests = sorted(set(digests))
        hows = {d: rng.choice(["flip", "truncate", "delete", "zero"]) for d in digests}
        for d in digests:
            damage_blob(s.blobs.path(d), hows[d], rng)
        report = s.audit()
    found = {d.digest: d for d in report.damaged}
    assert set(found) == set(digests), "audit finds every damaged blob, and only those"
    for d in digests:
        assert found[d].problem == ("missing" if hows[d] == "delete" else "damaged")
        assert found[d].owners == owners[d]
        assert all(", tensor " in o or o.endswith(" manifest") for o in owners[d])  # a tensor, or a manifest
    masks = [o for d in digests for o in owners[d] if " mask of entry " in o]
    out = clean_failure(run_cli(trial["store"], "audit"), codes=(1,))
    for d in digests:
        assert d in out
    for m in masks[:3]:
        assert m in out, "a damaged mask names its version, entry and tensor"
    log_trial("blobs", f"seed {seed}: {len(digests)} blobs {sorted(set(hows.values()))}", True)
    log_trial("blobs-count", str(len(digests)), True)


def _foreign_mmer_registry(trial, tmp_path):
    from mmer_cl.store import Store

    other = tmp_path / "other-store"
    Store.init(other, trial["family"] / "base", actor="x").close()
    return (other / "registry.db").read_bytes()


def _foreign_sqlite(tmp_path):
    path = tmp_path / "foreign.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO customers (name) VALUES ('ada')")
    con.commit()
    con.close()
    return path.read_bytes()


DAMAGE = ["zero", "truncated-header", "truncated-half", "random", "foreign-mmer", "foreign-sqlite", "deleted",
          "empty-tables"]
COMMANDS = [["versions"], ["audit"], ["gc"], ["entries", "--json"], ["expand", "--density", "0.3"],
            ["rollback", "1"], ["remove", "audio"], ["history"], ["report", "--no-svd"]]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_registry_is_refused_and_nothing_is_deleted_or_recreated(trial, tmp_path, kind):
    store = trial["store"]
    db = store / "registry.db"
    good = db.read_bytes()
    rng = random.Random(kind)
    if kind == "zero":
        db.write_bytes(b"")
    elif kind == "truncated-header":
        db.write_bytes(good[:50])
    elif kind == "truncated-half":
        db.write_bytes(good[: len(good) // 2])
    elif kind == "random":
        db.write_bytes(bytes(rng.randrange(256) for _ in range(len(good))))
    elif kind == "foreign-mmer":
        db.write_bytes(_foreign_mmer_registry(trial, tmp_path))
    elif kind == "foreign-sqlite":
        db.write_bytes(_foreign_sqlite(tmp_path))
    elif kind == "deleted":
        db.unlink()
    elif kind == "empty-tables":  # what the previous release made of a 0-byte file: tables, no rows
        db.unlink()
        from registry import Registry, sqlite_url

        Registry(sqlite_url(db)).close()
    for side in ("registry.db-wal", "registry.db-shm"):
        (store / side).unlink(missing_ok=True)
    before_db = db.read_bytes() if db.exists() else None
    objects = snapshot_files(store / "objects")

    commands = COMMANDS + [["init", "--base", trial["family"] / "base"],
                           ["export", "--entry", "vision", tmp_path / "out"],
                           ["register", trial["speech"], "--name", "speech", "--modality", "speech"]]
    if not FULL:
        commands = [["audit"], ["gc"], ["init", "--base", trial["family"] / "base"], ["versions"]]
    for args in commands:
        out = clean_failure(run_cli(store, *args))
        assert "restore" in out.lower() or "another" in out.lower() or "different stores" in out, (args, out)
        assert snapshot_files(store / "objects") == objects, f"{args} changed the objects"
        assert (db.read_bytes() if db.exists() else None) == before_db, f"{args} changed the registry"
        assert not (tmp_path / "out").exists()
        log_trial("registry", f"{kind}: {args[0]}", True)

    out = clean_failure(run_cli(store, "audit", "--json"), codes=(1,))
    assert json.loads(out)["ok"] is False

    # Restoring the backup brings everything back.
    db.write_bytes(good)
    assert run_cli(store, "audit").exit_code == 0


def test_blobs_of_another_store_are_refused(trial, tmp_path):
    from mmer_cl.store import Store

    other = tmp_path / "other"
    Store.init(other, trial["family"] / "base", actor="x").close()
    shutil.copy(other / "objects" / "mmer-store.json", trial["store"] / "objects" / "mmer-store.json")
    objects = snapshot_files(trial["store"] / "objects")
    out = clean_failure(run_cli(trial["store"], "gc"))
    assert "different stores" in out
    assert snapshot_files(trial["store"] / "objects") == objects
    log_trial("registry", "swapped marker: gc", True)


def test_a_store_of_the_previous_release_is_migrated_on_open(trial):
    from mmer_cl.store import Store

    store = trial["store"]
    (store / "objects" / "mmer-store.json").unlink()
    con = sqlite3.connect(store / "registry.db")
    con.execute("DELETE FROM meta WHERE key = 'store_id'")
    con.commit()
    con.close()
    assert run_cli(store, "audit").exit_code == 0
    marker = json.loads((store / "objects" / "mmer-store.json").read_text())
    with Store.open(store) as s:
        assert s.store_id == marker["store_id"] == s.registry.get_meta("store_id")
        assert not s.audit().damaged


def test_audit_checks_the_database_itself(trial):
    from mmer_cl.store import Store

    with Store.open(trial["store"]) as s:
        assert s.audit().database_problems == []
        assert s.audit().ok
