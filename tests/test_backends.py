"""Blob backends: the same contract on a local directory and on an fsspec filesystem (memory://, as S3 is
exercised against a real server in tests/scale)."""

import uuid

import pytest

from mmer_cl.errors import StoreDamagedError
from mmer_cl.store.locks import advisory_key, writer_lock
from mmer_cl.store import Store, StoreError
from registry.postgres import normalise_url
from registry.registry import shown_url
from storage import BlobError, BlobStore, scrub_url
from storage.backends.fsspec_backend import FsspecBackend
from storage.backends.local import LocalBackend


@pytest.fixture(params=["local", "memory"])
def blobs(request, tmp_path):
    if request.param == "local":
        return BlobStore.open(tmp_path / "objects", create=True)
    return BlobStore.open(f"memory://mmer-test-{uuid.uuid4().hex}/objects", create=True)


def damage(store: BlobStore, digest: str, data: bytes | None) -> None:
    """Overwrite (or delete, with None) a blob behind the store's back."""
    key = f"{digest[:2]}/{digest[2:]}"
    backend = store.backend
    if isinstance(backend, LocalBackend):
        path = backend.local_path(key)
        path.unlink() if data is None else path.write_bytes(data)
    else:
        path = f"{backend.root}/{key}"
        backend.fs.rm_file(path) if data is None else backend.fs.pipe_file(path, data)


def test_blobs_are_content_addressed_deduplicated_and_checked_on_read(blobs):
    a = blobs.put(b"hello")
    assert blobs.put(b"hello") == a and blobs.get(a) == b"hello" and blobs.size(a) == 5
    assert list(blobs.digests()) == [a]
    b, c = blobs.put(b"two"), blobs.put(b"three")
    damage(blobs, b, b"evil")
    damage(blobs, c, None)
    assert (blobs.verify(a), blobs.verify(b), blobs.verify(c)) == (None, "damaged", "missing")
    with pytest.raises(BlobError, match="damaged"):
        blobs.get(b)
    with pytest.raises(BlobError, match="missing from"):
        blobs.get(c)


def test_a_damaged_blob_is_rewritten_by_the_next_put_of_its_content(blobs):
    a = blobs.put(b"content")
    damage(blobs, a, b"x")
    assert blobs.put(b"content") == a and blobs.verify(a) is None
    damage(blobs, a, b"CONTENT")  # the right size: only the hash tells
    assert blobs.verify(a) == "damaged"
    with blobs.batch() as batch:
        assert batch.put(b"content") == a and batch.created == []  # repaired, never the batch's to remove
    assert blobs.verify(a) is None


def test_damaged_rows_make_gc_refuse_on_a_bucket_and_nothing_live_goes(family, tmp_path):
    """Issue 20, item 1, with the blobs (and so the manifests) on an fsspec filesystem."""
    import sqlite3

    objects = f"memory://rows-{uuid.uuid4().hex}/blobs"
    with Store.init(tmp_path / "s", family / "base", objects=objects) as store:
        store.register(family / "vision", "vision", "vision")
        store.register(family / "audio", "audio", "audio")
        store.expand()
        live = set(store.blobs.digests())
    con = sqlite3.connect(tmp_path / "s" / "registry.db")
    con.execute("PRAGMA foreign_keys=OFF")
    con.execute("DELETE FROM version_blobs WHERE id IN (SELECT id FROM version_blobs LIMIT 5)")
    con.commit()
    con.close()
    with Store.open(tmp_path / "s", objects=objects) as store:
        report = store.audit()
        assert not report.ok and "5 blob row(s) of its manifest are missing" in report.manifest_problems[0]
        with pytest.raises(StoreDamagedError, match="refusing to run gc"):
            store.gc()
        assert set(store.blobs.digests()) == live


def test_listing_is_paginated_and_gc_keeps_only_what_is_referenced(blobs):
    digests = [blobs.put(f"blob {i}".encode()) for i in range(7)]
    pages = list(blobs.pages(page_size=3))
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sorted(d for p in pages for d, _ in p) == sorted(digests)
    keep = digests[:2]
    result = blobs.gc(keep, page_size=2)
    assert result.removed == 5 and result.freed_bytes == sum(len(f"blob {i}") for i in range(2, 7))
    assert sorted(blobs.digests()) == sorted(keep)


def test_failed_batch_removes_only_its_own_blobs(blobs):
    old = blobs.put(b"old")
    with pytest.raises(RuntimeError):
        with blobs.batch() as batch:
            batch.put(b"old")
            batch.put(b"new")
            raise RuntimeError("crash")
    assert list(blobs.digests()) == [old]


def test_the_marker_is_read_and_written_at_the_root_and_never_listed_as_a_blob(blobs):
    assert blobs.read_marker() is None
    blobs.write_marker(b'{"store_id": "abc"}')
    blobs.write_marker(b'{"store_id": "abc", "v": 2}')
    assert blobs.read_marker() == b'{"store_id": "abc", "v": 2}'
    assert list(blobs.digests()) == [] and blobs.gc([]).removed == 0


def test_the_local_marker_is_the_file_mmer_store_json_in_objects(tmp_path):
    BlobStore(tmp_path).write_marker(b"{}")
    assert (tmp_path / "objects" / "mmer-store.json").read_bytes() == b"{}"


def test_a_location_that_does_not_exist_is_refused_unless_created(tmp_path):
    with pytest.raises(BlobError, match=f"no blob location at {tmp_path / 'nope'}"):
        BlobStore.open(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(BlobError, match="no blob location at memory://"):
        BlobStore.open(f"memory://absent-{uuid.uuid4().hex}/x")
    url = f"memory://new-{uuid.uuid4().hex}/x"
    BlobStore.open(url, create=True)
    assert isinstance(BlobStore.open(url).backend, FsspecBackend)  # exists now, even before any blob


def test_credentials_never_appear_in_messages(tmp_path):
    assert scrub_url("s3://AKIA:secret@bucket/p") == "s3://bucket/p"
    assert scrub_url("postgresql://u:pw@host:5432/db") == "postgresql://host:5432/db"
    assert scrub_url("/plain/path") == "/plain/path"
    assert "pw" not in shown_url("postgresql+psycopg://u:pw@host/db")
    with pytest.raises(BlobError) as info:
        BlobStore.open("s3://AKIA:secret@bucket/p")
    assert "secret" not in str(info.value) and "AWS_ACCESS_KEY_ID" in str(info.value)


def test_postgresql_urls_use_psycopg_and_others_are_unchanged():
    assert normalise_url("postgresql://h/db") == "postgresql+psycopg://h/db"
    assert normalise_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert normalise_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"


def test_advisory_keys_are_stable_signed_64_bit_and_per_store():
    assert advisory_key("a") == advisory_key("a") != advisory_key("b")
    assert -2**63 <= advisory_key(None) < 2**63


def test_sqlite_registries_lock_with_a_file(tmp_path):
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'r.db'}")
    with writer_lock(engine, tmp_path / ".lock"):
        assert (tmp_path / ".lock").exists()


def test_a_mistyped_store_with_a_separate_registry_creates_nothing(family, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    Store.init(tmp_path / "store", family / "base", url=url).close()
    with pytest.raises(StoreError, match="no blob location at .*stroe"):
        Store.open(tmp_path / "stroe", url=url)
    assert not (tmp_path / "stroe").exists()


def test_a_store_can_keep_its_blobs_elsewhere(family, tmp_path):
    objects = f"memory://elsewhere-{uuid.uuid4().hex}/blobs"
    with Store.init(tmp_path / "store", family / "base", objects=objects) as store:
        store.register(family / "vision", "vision", "vision")
        assert not (tmp_path / "store" / "objects").exists()
    with Store.open(tmp_path / "store", objects=objects) as store:
        assert [e.name for e in store.entries()] == ["vision"] and store.audit().ok


def test_the_cli_takes_the_blob_location_from_mmer_objects(family, tmp_path):
    from click.testing import CliRunner

    from mmer_cl.cli import cli

    objects = f"memory://env-{uuid.uuid4().hex}/blobs"
    runner = CliRunner()
    env = {"MMER_OBJECTS": objects}
    store = ["--store", str(tmp_path / "s"), "-q"]
    assert runner.invoke(cli, [*store, "init", "--base", str(family / "base")], env=env).exit_code == 0
    result = runner.invoke(cli, [*store, "register", str(family / "audio"), "--name", "audio", "--modality",
                                 "audio"], env=env)
    assert result.exit_code == 0, result.output
    assert len(list(BlobStore.open(objects).digests())) > 0 and not (tmp_path / "s" / "objects").exists()
    missing = runner.invoke(cli, [*store, "entries"], env={"MMER_OBJECTS": objects + "-typo"})
    assert missing.exit_code == 2 and "no blob location at memory://" in missing.output


def test_a_batch_interrupted_after_its_blob_appeared_still_removes_it(blobs, monkeypatch):
    """The object is written, then the writer is interrupted before it can note the blob as its own."""
    inner = blobs.backend.put

    def put_then_interrupt(key, data):
        inner(key, data)
        raise KeyboardInterrupt

    kept = blobs.put(b"already there")
    monkeypatch.setattr(blobs.backend, "put", put_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with blobs.batch() as batch:
            assert batch.put(b"already there") == kept  # existing: not written, not ours
            batch.put(b"brand new")
    assert list(blobs.digests()) == [kept] and blobs.has_blobs()


def test_a_store_whose_registry_and_blobs_both_live_elsewhere_needs_no_store_directory(family, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared' / 'registry.db'}"
    (tmp_path / "shared").mkdir()
    objects = f"memory://apart-{uuid.uuid4().hex}/blobs"
    with Store.init(tmp_path / "nowhere", family / "base", url=url, objects=objects) as store:
        store.register(family / "vision", "vision", "vision")
        assert store.expand().created
    assert not (tmp_path / "nowhere").exists()
    assert (tmp_path / "shared" / "registry.db.lock").exists()  # the writer lock sits beside the database
    with Store.open(tmp_path / "elsewhere", url=url, objects=objects) as store:
        assert [m.entry_name for m in store.version().members] == ["vision"]
