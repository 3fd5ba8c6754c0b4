"""Remote stores failing: messages, exit codes and bounded waits (issue 20, item 9).

An S3 blob location (moto's server, in this process) with an invalid bucket name, without credentials,
frozen (a socket that accepts and never answers) or killed: each ends in a message naming the bucket,
never "internal error", and a frozen server is given up on within MMER_S3_TIMEOUT x MMER_S3_ATTEMPTS.
A database URL with a non-numeric port is a message too.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import log_trial
from mmer_cl.cli import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale.servers import Unavailable, start_s3  # noqa: E402


@pytest.fixture
def s3(monkeypatch):
    try:
        server = start_s3()
    except Unavailable as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    try:
        server.make_bucket("mmer-test")
    except FileExistsError:  # moto keeps its buckets for the process; an earlier test made it
        pass
    yield server
    server.stop()


def invoke(store: Path, *args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--store", str(store), "--actor", "t", "-q", *map(str, args)])
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    return result.exit_code, result.output


@pytest.mark.parametrize("bucket", ["Bad_Bucket!", "ab", "a..b", "-x-", "192.168.1.1"])
def test_an_invalid_bucket_name_is_a_message(family, tmp_path, bucket):
    code, out = invoke(tmp_path / "s", "--objects", f"s3://{bucket}/mmer", "init", "--base", family / "base")
    assert code == 2 and "not a valid S3 bucket name" in out and bucket in out, out
    assert not (tmp_path / "s" / "registry.db").exists()
    log_trial("remote", f"invalid bucket {bucket}", True)


def test_s3_without_credentials_is_a_message(s3, family, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    code, out = invoke(tmp_path / "s", "--objects", "s3://mmer-test/m", "init", "--base", family / "base")
    assert code in (1, 2) and "credentials" in out and "mmer-test" in out and "AWS_ACCESS_KEY_ID" in out, out
    log_trial("remote", "S3 without credentials", True)


def test_a_frozen_s3_server_is_given_up_on_within_the_timeout(family, tmp_path, monkeypatch):
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(64)  # accepts connections (the kernel does), never answers a byte
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{frozen.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MMER_S3_TIMEOUT", "1")
    monkeypatch.setenv("MMER_S3_ATTEMPTS", "2")
    start = time.monotonic()
    try:
        code, out = invoke(tmp_path / "s", "--objects", "s3://mmer-test/m", "init", "--base", family / "base")
    finally:
        frozen.close()
    took = time.monotonic() - start
    assert code in (1, 2) and "mmer-test" in out and "no answer within 1 s" in out, out
    assert took < 60, took  # 2 attempts x 1 s each, plus start-up; was 427 s with the library defaults
    log_trial("remote", f"frozen S3 server given up on in {took:.0f} s", True)


def test_a_killed_s3_server_is_named_with_its_bucket(s3, family, tmp_path, monkeypatch):
    store = tmp_path / "s"
    code, out = invoke(store, "--objects", "s3://mmer-test/m", "init", "--base", family / "base")
    assert code == 0, out
    monkeypatch.setenv("MMER_S3_TIMEOUT", "2")
    monkeypatch.setenv("MMER_S3_ATTEMPTS", "1")
    s3.server.stop()
    code, out = invoke(store, "--objects", "s3://mmer-test/m", "register", family / "vision", "--name", "vision",
                       "--modality", "vision")
    assert code in (1, 2) and "mmer-test" in out and "reach" in out, out
    log_trial("remote", "killed S3 server named with its bucket", True)


@pytest.mark.parametrize("name, value", [("MMER_S3_TIMEOUT", "nan"), ("MMER_S3_TIMEOUT", "-1"),
                                         ("MMER_S3_TIMEOUT", "soon"), ("MMER_S3_ATTEMPTS", "0"),
                                         ("MMER_S3_ATTEMPTS", "2.5")])
def test_the_s3_wait_settings_are_checked(family, tmp_path, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    code, out = invoke(tmp_path / "s", "--objects", "s3://mmer-test/m", "init", "--base", family / "base")
    assert code == 2 and name in out, out


@pytest.mark.parametrize("url", ["postgresql://u@h:notaport/db", "postgresql://u@[::1/db",
                                 "sqlite:///x.db?mode=ro&", "postgresql://u@h:99999999/db"])
def test_a_malformed_database_url_is_a_message(tmp_path, url):
    code, out = invoke(tmp_path / "s", "--db-url", url, "versions")
    assert code in (1, 2) and out.strip(), out
    log_trial("remote", f"malformed --db-url {url}", True)
