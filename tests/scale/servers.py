"""Real servers for the scale-out tests, started by the test suite itself on 127.0.0.1.

- PostgreSQL: Debian's ``postgresql`` package (initdb + pg_ctl into a temp
  dir; as the ``postgres`` user via ``runuser`` when we are root).
- S3: moto's standalone server (``moto[server]``), in a thread.
- Ray: a local cluster with 2 worker CPUs and a small object store.

Each ``start_*`` returns a handle with ``stop()``, or raises ``Unavailable``
with the reason when the server's software is not installed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Unavailable(Exception):
    """A server's software is not installed here; the message says which and how to get it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- PostgreSQL ------------------------------------------------------------------------------
def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path:
        return path
    raise Unavailable(f"PostgreSQL's {name} is not installed (apt-get install -y postgresql)")


@dataclass
class Postgres:
    port: int
    data: Path
    as_user: list[str]
    pg_ctl: str

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(self.as_user + [self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.data.parent, ignore_errors=True)


def start_postgres() -> Postgres:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Unavailable("psycopg is not installed (pip install -e '.[postgres]' in a clone of mmer-cl)") from None
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    as_user: list[str] = []
    top = Path(tempfile.mkdtemp(prefix="mmer-pg-"))
    data = top / "data"
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable("no postgres user (apt-get install -y postgresql creates it)") from None
        os.chown(top, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_user + [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                              "--no-sync"], check=True, capture_output=True, timeout=120)
    port = free_port()
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    subprocess.run(as_user + [pg_ctl, "-D", str(data), "-o", opts, "-l", str(data / "server.log"), "-w",
                              "start"], check=True, capture_output=True, timeout=120)
    return Postgres(port, data, as_user, pg_ctl)


# ---- S3 (moto) ------------------------------------------------------------------------------
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3:
    endpoint: str
    server: object
    saved_env: dict = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client process needs to reach this server."""
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def make_bucket(self, name: str) -> str:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return name

    def stop(self) -> None:
        self.server.stop()
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_s3() -> S3:
    try:
        from moto.server import ThreadedMotoServer
        import s3fs  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"{exc.name} is not installed (pip install -e '.[s3]' in a clone of mmer-cl 'moto[server]')") from None
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3(f"http://127.0.0.1:{port}", server)
    for k, v in s3.env().items():  # this process (and every process it starts) talks to the test server
        s3.saved_env[k] = os.environ.get(k)
        os.environ[k] = v
    return s3


# ---- Ray ------------------------------------------------------------------------------------
@dataclass
class RayCluster:
    address: str

    def stop(self) -> None:
        import ray

        ray.shutdown()


def start_ray(num_cpus: int = 2) -> RayCluster:
    try:
        import ray
    except ImportError:
        raise Unavailable("ray is not installed (pip install -e '.[ray]' in a clone of mmer-cl)") from None
    # Workers import this checkout's packages, whatever is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH")] if p)
    ctx = ray.init(address="local", num_cpus=num_cpus, object_store_memory=200 * 2**20, include_dashboard=False,
                   _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    return RayCluster(ctx.address_info.get("address") or ctx.address_info.get("gcs_address", ""))


def wait_until(predicate, timeout: float = 30.0, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False
