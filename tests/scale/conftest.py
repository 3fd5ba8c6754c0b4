"""Fixtures that start real servers on 127.0.0.1 (see servers.py); tests skip, saying why, only when a
server's software is not installed. `.ci/run` installs all of them."""

import uuid

import pytest

from scale import servers


def _start(name, starter):
    try:
        return starter()
    except servers.Unavailable as exc:
        print(f"\nSKIP {name}: {exc}")
        pytest.skip(f"{name} unavailable: {exc}")


@pytest.fixture(scope="session")
def postgres():
    pg = _start("PostgreSQL", servers.start_postgres)
    yield pg
    pg.stop()


@pytest.fixture
def pg_url(postgres):
    """A fresh, empty database on the test server."""
    return postgres.create_database(f"mmer_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def s3():
    server = _start("S3 (moto)", servers.start_s3)
    yield server
    server.stop()


@pytest.fixture
def bucket_url(s3):
    """``s3://NEW-BUCKET/store``: an existing, empty bucket and a prefix in it."""
    name = s3.make_bucket(f"mmer-{uuid.uuid4().hex[:12]}")
    return f"s3://{name}/store"


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A local Ray cluster with 2 worker CPUs; started after the S3 server so workers see its endpoint."""
    cluster = _start("Ray", servers.start_ray)
    yield cluster
    cluster.stop()
