"""Distributed expand on a local Ray cluster (2 workers): bit-identical to a local expand, and a killed worker
leaves nothing committed and only unreferenced blobs, which gc removes."""

import json
import os

import pytest

import mmer_cl.store.expansion_plan as expansion_plan
from mmer_cl.distributed.ray_expand import DistributedError, RayRunner
from mmer_cl.store import Store
from scale.helpers import cli_runner, weights_digest

pytestmark = [pytest.mark.scale, pytest.mark.slow]

KILLED_KEY = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    """Tiny models fit one tensor group; smaller groups give the cluster several tasks to share."""
    monkeypatch.setattr(expansion_plan, "PACK_TARGET", 2000)


def version_blobs(store: Store) -> list[tuple]:
    v = store.version()
    return sorted((r.role, r.key, r.entry_id, r.digest) for r in store.registry.version_blobs(v.id))


def registered_store(path, family, objects=None, url=None, entries=("vision", "audio")) -> Store:
    store = Store.init(path, family / "base", objects=objects, url=url)
    for name in entries:
        store.register(family / name, name, name)
    return store


def test_ray_expand_is_bit_identical_to_a_local_expand(family, ray_cluster, tmp_path):
    local = registered_store(tmp_path / "local", family)
    distributed = registered_store(tmp_path / "ray", family)
    steps = []
    runner = RayRunner()
    local.expand()
    result = distributed.expand(runner=runner, progress=lambda i, n, label: steps.append((i, n, label)))
    assert result.created and version_blobs(distributed) == version_blobs(local)
    groups = len(steps)
    assert groups > 2 and [s[:2] for s in steps] == [(i, groups) for i in range(1, groups + 1)]
    assert all(label.startswith("group ") for _, _, label in steps)
    summary = runner.summary()
    assert summary["groups"] == groups and summary["read_bytes"] > 0 and summary["written_bytes"] > 0
    assert len(summary["workers"]) >= 1

    # incremental: a third entry, coded against the previous version, on the cluster again
    for store in (local, distributed):
        store.register(family / "video", "video", "video")
    assert local.expand().incremental
    assert distributed.expand(runner=runner).incremental
    assert version_blobs(distributed) == version_blobs(local)
    for entry in ("vision", "audio", "video"):
        local.export(entry, tmp_path / "out-local" / entry)
        distributed.export(entry, tmp_path / "out-ray" / entry)
        assert weights_digest(tmp_path / "out-local" / entry) == weights_digest(tmp_path / "out-ray" / entry)
    local.close(), distributed.close()


def test_a_killed_worker_commits_nothing_and_gc_cleans_up(family, ray_cluster, tmp_path):
    store = registered_store(tmp_path / "store", family)

    def killer(reader, put, plan, group, device):
        if any(job.key == KILLED_KEY for job in group):
            os._exit(1)  # the worker process dies mid-expand, as if the node were lost
        return expansion_plan.expand_group(reader, put, plan, group, device)

    before = len(list(store.blobs.digests()))
    with pytest.raises(DistributedError, match="Nothing was committed") as info:
        store.expand(runner=RayRunner(retries=0, group_fn=killer))
    assert "tensor group" in str(info.value) and "mmer gc" in str(info.value)
    print(info.value)
    assert store.versions() == [] and store.registry.version(store.base().id) is None
    assert [e.action for e in store.history()] == ["init", "register", "register"]
    report = store.audit()
    assert report.ok and report.unreferenced == len(list(store.blobs.digests())) - before > 0
    assert store.gc().removed == report.unreferenced
    assert len(list(store.blobs.digests())) == before and store.audit().unreferenced == 0

    # the cluster survives a lost worker: the same expand then succeeds
    assert store.expand(runner=RayRunner()).created
    store.close()


def test_a_worker_killed_once_is_retried_and_the_result_is_unchanged(family, ray_cluster, tmp_path):
    flag = tmp_path / "killed-once"

    def kill_once(reader, put, plan, group, device):
        if any(job.key == KILLED_KEY for job in group) and not flag.exists():
            flag.write_text("x")
            os._exit(1)
        return expansion_plan.expand_group(reader, put, plan, group, device)

    local = registered_store(tmp_path / "local", family)
    local.expand()
    store = registered_store(tmp_path / "store", family)
    store.expand(runner=RayRunner(retries=2, group_fn=kill_once))
    assert flag.exists() and version_blobs(store) == version_blobs(local)
    local.close(), store.close()


def test_cli_expand_on_ray_with_postgresql_and_s3(family, ray_cluster, pg_url, bucket_url, tmp_path):
    remote = cli_runner("--db-url", pg_url, "--objects", bucket_url)
    local = cli_runner("--store", tmp_path / "local")
    for run in (remote, local):
        run("init", "--base", family / "base")
        run("register", family / "vision", "--name", "vision", "--modality", "vision")
        run("register", family / "audio", "--name", "audio", "--modality", "audio")
    out = json.loads(remote("expand", "--ray", "--json"))
    assert out["created"] and out["distributed"]["groups"] > 2 and out["distributed"]["written_bytes"] > 0
    local("expand")
    remote("export", "--entry", "audio", tmp_path / "a-remote")
    local("export", "--entry", "audio", tmp_path / "a-local")
    assert weights_digest(tmp_path / "a-remote") == weights_digest(tmp_path / "a-local")


def test_entries_registered_by_reference_are_read_by_the_workers_from_their_paths(family, ray_cluster, tmp_path):
    stores = []
    for name in ("local", "ray"):
        store = Store.init(tmp_path / name, family / "base")
        store.register(family / "vision", "vision", "vision")
        store.register(family / "audio", "audio", "audio", reference=True)  # workers re-read the checkpoint
        stores.append(store)
    local, distributed = stores
    local.expand()
    distributed.expand(runner=RayRunner())
    assert version_blobs(distributed) == version_blobs(local)
    local.close(), distributed.close()
