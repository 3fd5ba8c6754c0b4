"""The store on a shared PostgreSQL registry and an S3 bucket (moto), as several hosts would use it."""

import threading
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from mmer_cl.store.locks import advisory_key, advisory_lock, writer_lock
from mmer_cl.store import Store, StoreError
from registry import SCHEMA_VERSION, Registry
from scale.helpers import cli_runner, mmer_process, tree_digest, weights_digest

pytestmark = [pytest.mark.scale, pytest.mark.slow]


def test_plain_postgresql_urls_work_and_the_schema_is_created(pg_url):
    assert pg_url.startswith("postgresql://")
    reg = Registry(pg_url)
    assert reg.engine.dialect.name == "postgresql" and reg.engine.dialect.driver == "psycopg"
    assert reg.schema_version() >= 1
    Registry(pg_url).close()  # opening again (another host) is fine: setup is idempotent
    reg.close()


def test_the_audit_log_rejects_update_delete_and_truncate(pg_url):
    reg = Registry(pg_url)
    reg.record("ci", "note", "subject", "a", "b")
    with reg.engine.connect() as conn:
        for sql in ["UPDATE events SET actor = 'mallory'", "DELETE FROM events", "TRUNCATE events"]:
            with pytest.raises(DBAPIError, match="append-only"):
                conn.execute(text(sql))
            conn.rollback()
    assert [(e.actor, e.action) for e in reg.events()] == [("ci", "note")]
    reg.close()


def test_unreachable_registry_is_a_clear_error_without_the_password(postgres):
    url = f"postgresql://postgres:hunter2@127.0.0.1:{postgres.port}/no_such_db"
    with pytest.raises(Exception) as info:
        Registry(url)
    assert "hunter2" not in str(info.value) and "no_such_db" in str(info.value)


def test_advisory_lock_keeps_writers_on_two_connections_apart(pg_url):
    engine_a, engine_b = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://")), \
        create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    order = []
    with advisory_lock(engine_a, advisory_key("s1")):
        t = threading.Thread(target=lambda: (advisory_lock(engine_b, advisory_key("s1")).__enter__(),
                                             order.append("b got it")))
        t.start()
        time.sleep(0.5)
        order.append("a releases")
    t.join(10)
    assert order == ["a releases", "b got it"]
    # writer_lock picks the advisory lock for PostgreSQL (no lock file is touched)
    with writer_lock(engine_a, lock_file=__import__("pathlib").Path("/nonexistent/.lock"), store_id="s2"):
        pass
    engine_a.dispose(), engine_b.dispose()


def test_walkthrough_on_postgresql_and_s3_exports_like_a_local_store(family, pg_url, bucket_url, tmp_path):
    remote = cli_runner("--store", tmp_path / "unused", "--db-url", pg_url, "--objects", bucket_url)
    local = cli_runner("--store", tmp_path / "local")
    for run in (remote, local):
        assert "initialised" in run("init", "--base", family / "base")
        run("register", family / "vision", "--name", "vision", "--modality", "vision")
        run("register", family / "audio", "--name", "audio", "--modality", "audio")
        assert "version 1" in run("expand")
        run("register", family / "video", "--name", "video", "--modality", "video")
        assert "version 2 (incrementally)" in run("expand")
        assert "v2 -> v1" in run("rollback", "1")
        assert "v1 -> v2" in run("rollback", "2")
        assert "ok:" in run("audit")
    assert not (tmp_path / "unused").exists(), "a fully remote store writes nothing in the store directory"
    for entry in ("vision", "audio", "video"):
        remote("export", "--entry", entry, tmp_path / "remote" / entry)
        local("export", "--entry", entry, tmp_path / "local-out" / entry)
        assert weights_digest(tmp_path / "remote" / entry) == weights_digest(tmp_path / "local-out" / entry)
    report = remote("report", "--no-svd", "--ranks", "8")
    assert "On disk" in report and "blobs at their location" in report
    remote("export", "--text", tmp_path / "remote-text")
    local("export", "--text", tmp_path / "local-text")
    assert weights_digest(tmp_path / "remote-text") == weights_digest(tmp_path / "local-text")

    # remove + gc on the bucket: nothing referenced goes, and audit stays clean
    remote("remove", "audio")
    assert "removed 0 blobs" in remote("gc")
    store = Store.open(tmp_path / "unused", url=pg_url, objects=bucket_url)
    orphan = store.blobs.put(b"left by a crash")
    assert store.audit().unreferenced == 1
    assert store.gc().removed == 1 and not store.blobs.exists(orphan)
    assert store.audit().ok
    actions = [e.action for e in store.history()]
    assert actions[:8] == ["init", "register", "register", "expand", "register", "expand", "rollback", "rollback"]
    store.close()


def test_two_hosts_register_concurrently_into_one_registry_and_bucket(family, pg_url, bucket_url, tmp_path):
    remote = ["--db-url", pg_url, "--objects", bucket_url, "--actor"]
    cli_runner("--db-url", pg_url, "--objects", bucket_url)("init", "--base", family / "base")
    host_a = mmer_process(tmp_path / "host-a", *remote, "a", "register", family / "vision", "--name", "vision",
                          "--modality", "vision")
    host_b = mmer_process(tmp_path / "host-b", *remote, "b", "register", family / "audio", "--name", "audio",
                          "--modality", "audio")
    for proc in (host_a, host_b):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    expand = mmer_process(tmp_path / "host-a", *remote, "a", "expand")
    out, _ = expand.communicate(timeout=300)
    assert expand.returncode == 0 and "version 1" in out, out
    exports = [mmer_process(tmp_path / host, *remote, host, "export", "--entry", "vision", "out")
               for host in ("host-a", "host-b")]
    for proc in exports:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    a, b = tree_digest(tmp_path / "host-a" / "out"), tree_digest(tmp_path / "host-b" / "out")
    assert a == b and any(name.endswith(".safetensors") for name in a)  # every byte, provenance included
    # neither host created a store directory of its own
    assert not (tmp_path / "host-a" / "mmer-store").exists() and not (tmp_path / "host-b" / "mmer-store").exists()
    store = Store.open(tmp_path, url=pg_url, objects=bucket_url)
    assert sorted(e.name for e in store.entries()) == ["audio", "vision"]
    assert {e.actor for e in store.history() if e.action == "register"} == {"a", "b"}
    assert store.audit().ok
    store.close()


def test_a_mistyped_blob_location_is_refused_not_created(family, pg_url, bucket_url, tmp_path):
    Store.init(tmp_path, family / "base", url=pg_url, objects=bucket_url).close()
    with pytest.raises(StoreError, match="no blob location at .*typo"):  # --store typo, blobs by default in it
        Store.open(tmp_path / "typo", url=pg_url)
    assert not (tmp_path / "typo").exists()
    with pytest.raises(StoreError, match="no blob location at s3://.*/stroe"):
        Store.open(tmp_path, url=pg_url, objects=bucket_url.replace("/store", "/stroe"))
    run = cli_runner("--db-url", pg_url, "--objects", "s3://AKIAEXAMPLE:topsecret@bucket/store")
    out = run("entries", code=2)
    assert "topsecret" not in out and "credentials in a blob location URL are refused" in out


def test_a_writer_on_another_host_waits_for_the_advisory_lock(family, pg_url, bucket_url, tmp_path):
    store = Store.init(tmp_path / "here", family / "base", url=pg_url, objects=bucket_url)
    with store._lock():  # this "host" is writing
        other = mmer_process(tmp_path / "there", "--db-url", pg_url, "--objects", bucket_url, "register",
                             family / "vision", "--name", "vision", "--modality", "vision")
        time.sleep(8)
        assert other.poll() is None, "the other host must wait while the lock is held"
        assert store.entries() == []
    out, _ = other.communicate(timeout=300)
    assert other.returncode == 0, out
    assert [e.name for e in store.entries()] == ["vision"]
    store.close()


def test_a_registry_paired_with_another_stores_bucket_is_refused(family, postgres, s3, tmp_path):
    from mmer_cl.errors import MmerError

    stores = {}
    for name in ("a", "b"):
        url = postgres.create_database(f"mmer_pair_{name}_{tmp_path.name[-6:].lower()}")
        objects = f"s3://{s3.make_bucket(f'mmer-pair-{name}-{abs(hash(tmp_path)) % 10**8}')}/store"
        Store.init(tmp_path / name, family / "base", url=url, objects=objects).close()
        stores[name] = (url, objects)
    with pytest.raises(MmerError, match="belongs to store") as info:
        Store.open(tmp_path, url=stores["a"][0], objects=stores["b"][1])
    assert stores["b"][1] in str(info.value)
    run = cli_runner("--db-url", stores["b"][0].replace("postgres@", "postgres:hunter2@"), "--objects",
                     stores["a"][1])
    out = run("entries", code=1)
    assert "belongs to store" in out and stores["a"][1] in out and "hunter2" not in out
    with Store.open(tmp_path, url=stores["a"][0], objects=stores["a"][1]) as store:  # the right pair still opens
        assert store.audit().ok


def test_damaged_rows_on_postgresql_never_make_gc_delete_live_blobs_on_s3(family, pg_url, bucket_url, tmp_path):
    """Issue 20, item 1, on a shared registry and a bucket: manifests in the bucket, rows in PostgreSQL."""
    remote = cli_runner("--store", tmp_path / "unused", "--db-url", pg_url, "--objects", bucket_url)
    remote("init", "--base", family / "base")
    remote("register", family / "vision", "--name", "vision", "--modality", "vision")
    remote("register", family / "audio", "--name", "audio", "--modality", "audio")
    remote("expand")
    remote("export", "--entry", "audio", tmp_path / "before")
    store = Store.open(tmp_path / "unused", url=pg_url, objects=bucket_url)
    live = set(store.registry.blob_owners())
    assert all(f.manifest for f in [*store.registry.entry_facts(), *store.registry.version_facts()])
    engine = store.registry.engine
    with engine.begin() as conn:  # a backup of the rows about to go
        saved = conn.execute(text("SELECT * FROM version_blobs ORDER BY id LIMIT 5")).mappings().all()
        conn.execute(text("DELETE FROM version_blobs WHERE id IN (SELECT id FROM version_blobs ORDER BY id LIMIT 5)"))
    assert "5 blob row(s) of its manifest are missing" in remote("audit", code=1)
    assert "refusing to run gc" in remote("gc", code=1)
    assert live <= set(store.blobs.digests())
    with engine.begin() as conn:  # restored
        for row in saved:
            conn.execute(text("INSERT INTO version_blobs (id, version_id, entry_id, role, key, digest, stored_bytes, "
                              "raw_bytes) VALUES (:id, :version_id, :entry_id, :role, :key, :digest, :stored_bytes, "
                              ":raw_bytes)"), dict(row))
    assert "ok:" in remote("audit")
    remote("export", "--entry", "audio", tmp_path / "after")
    assert weights_digest(tmp_path / "after") == weights_digest(tmp_path / "before")
    # a running export holds the export lock (shared advisory lock): gc leaves its partial directory
    with store._export_lock():
        partial = tmp_path / ".out.running.partial"
        partial.mkdir()
        (partial / ".mmer-export.json").write_text('{"mmer_export": 1}')
        store.registry.record("t", "export", str(tmp_path / "out"), "", "", {"target": str(tmp_path / "out")})
        assert "0 partial exports" in remote("gc") and partial.exists()
    assert "1 partial exports" in remote("gc") and not partial.exists()
    store.close()


def test_a_schema_3_registry_on_postgresql_is_migrated_and_its_rows_described(family, pg_url, bucket_url,
                                                                              tmp_path):
    from registry.postgres import normalise_url

    remote = cli_runner("--store", tmp_path / "unused", "--db-url", pg_url, "--objects", bucket_url)
    remote("init", "--base", family / "base")
    remote("register", family / "vision", "--name", "vision", "--modality", "vision")
    remote("expand")
    remote("export", "--entry", "vision", tmp_path / "before")
    engine = create_engine(normalise_url(pg_url))
    with engine.begin() as conn:  # as the previous release left it
        conn.execute(text("ALTER TABLE entries DROP COLUMN manifest"))
        conn.execute(text("ALTER TABLE versions DROP COLUMN manifest"))
        conn.execute(text("ALTER TABLE entries DROP COLUMN codec"))  # added by schema 5
        conn.execute(text("UPDATE meta SET value = '3' WHERE key = 'schema_version'"))
    engine.dispose()
    with Store.open(tmp_path / "unused", url=pg_url, objects=bucket_url) as store:
        assert store.registry.schema_version() == SCHEMA_VERSION == 5 and store.registry.manifests_complete()
        assert {e.codec for e in store.entries()} == {"lossless"}
        assert all(f.manifest for f in [*store.registry.entry_facts(), *store.registry.version_facts()])
        assert store.audit().ok
    remote("export", "--entry", "vision", tmp_path / "after")
    assert weights_digest(tmp_path / "after") == weights_digest(tmp_path / "before")
    assert "removed 0 blobs" in remote("gc")
