"""A registry written by mmer-cl 0.1.0 (schema 1) opens, is migrated, and its versions export bit for bit."""

import sqlite3
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine

from mmer_cl import MergeParams
from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.store import Store
from registry import SCHEMA_VERSION, Registry, RegistryError, sqlite_url
from registry.migrations import STEPS, read_version, upgrade

V1_SQL = Path(__file__).parent / "fixtures" / "registry_schema_v1.sql"


def downgrade_to_v1(db: Path) -> None:
    """Rewrite ``db`` as release 0.1.0 would have: its exact v1 tables, holding the same rows."""
    old = db.with_name("v1.db")
    con = sqlite3.connect(old)
    con.executescript(V1_SQL.read_text())
    con.execute("ATTACH DATABASE ? AS cur", (str(db),))
    tables = [r[0] for r in con.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'")]
    for t in tables:
        cols = ", ".join(f'"{r[1]}"' for r in con.execute(f"PRAGMA main.table_info({t})"))
        con.execute(f"INSERT INTO main.{t} ({cols}) SELECT {cols} FROM cur.{t}")
    con.execute("UPDATE main.meta SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.execute("DETACH DATABASE cur")
    con.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    old.rename(db)


def exported(store, name, version, out):
    ckpt = Checkpoint(store.export(name, out, version=version))
    cards = ("README.md", "MMER_CARD.md", ".mmer-export.json")  # the card and the marker hold the export time
    files = {p.name: p.read_bytes() for p in Path(out).iterdir() if p.suffix != ".safetensors" and p.name not in cards}
    return {n: ckpt.get(n) for n in ckpt.names()}, files


def test_a_schema_1_registry_is_migrated_and_old_versions_export_bit_for_bit(family, tmp_path):
    root = tmp_path / "store"
    with Store.init(root, family / "base", actor="old") as s:
        s.register(family / "vision", "vision", "vision")
        s.register(family / "audio", "audio", "audio")
        s.expand(MergeParams(density=0.5))
        s.register(family / "video", "video", "video")
        s.expand()
        before = {(n, v): exported(s, n, v, tmp_path / f"before-{n}-{v}") for n, v in
                  [("vision", 1), ("audio", 1), ("video", 2), ("vision", 2)]}
    downgrade_to_v1(root / "registry.db")
    con = sqlite3.connect(root / "registry.db")
    assert "lineage" not in [r[1] for r in con.execute("PRAGMA table_info(entries)")]
    assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tags'").fetchone()[0] == 0
    con.close()

    with Store.open(root) as s:
        assert s.registry.schema_version() == SCHEMA_VERSION == 5
        steps = [(e.before, e.after) for e in s.history() if e.action == "migrate"]
        assert steps == [("schema 1", "schema 2"), ("schema 2", "schema 3"), ("schema 3", "schema 4"),
                         ("schema 4", "schema 5")]
        assert s.registry.manifests_complete() and s.audit().ok  # the first open wrote every row's manifest
        assert all(f.manifest for f in [*s.registry.entry_facts(), *s.registry.version_facts()])
        assert [v.number for v in s.versions()] == [1, 2] and s.version().number == 2
        for (n, v), (tensors, files) in before.items():
            t2, f2 = exported(s, n, v, tmp_path / f"after-{n}-{v}")
            assert f2 == files and t2.keys() == tensors.keys()
            assert all(torch.equal(tensors[k], t2[k]) for k in tensors), (n, v)
        # the new conventions work on migrated rows
        assert s.register(family / "audio", "audio", "audio", update=False).created is False
        s.tag({"migrated": "yes"}, version=1)
        s.set_alias("old", "v1")
        assert s.version("old").tags == {"migrated": "yes"}
        r = s.register(family / "base", "audio", "audio", update=True, max_relative_change=1.0)
        assert r.entry.revision == 2
    with Store.open(root) as s:  # opening again applies nothing
        assert [e.action for e in s.history()].count("migrate") == 4


def test_a_newer_registry_is_refused_with_the_fix(tmp_path):
    reg = Registry(sqlite_url(tmp_path / "r.db"))
    reg.close()
    con = sqlite3.connect(tmp_path / "r.db")
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(RegistryError, match="upgrade mmer-cl"):
        Registry(sqlite_url(tmp_path / "r.db"))


def test_steps_are_ordered_and_end_at_the_schema_version(tmp_path):
    assert [s.version for s in STEPS] == list(range(2, SCHEMA_VERSION + 1))
    engine = create_engine(sqlite_url(tmp_path / "empty.db"))
    with engine.connect() as conn:
        assert read_version(conn) is None
    assert upgrade(engine) == []  # a fresh database is created at the current schema, not migrated
