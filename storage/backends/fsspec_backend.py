"""Blobs on any fsspec filesystem: ``s3://bucket/prefix`` (s3fs), ``gs://``, ``memory://`` ...

- Atomic writes: on object stores (S3, GCS, Azure, memory) one ``pipe_file``
  is one PUT (or a multipart upload completed in one call), so an object
  appears whole or not at all under its final key and no temp object is
  needed. On other filesystems the bytes go to a ``.tmp-`` name and are moved.
- Listing for gc is paginated: one listing of the top level, then one per
  ``ab/`` prefix, each a bounded page (s3fs itself pages ListObjectsV2 by
  1000 keys); directory listings are never cached, so another host's writes
  are seen.
- Credentials come only from the filesystem's standard configuration (for
  S3: the AWS environment variables, ``~/.aws/config`` and
  ``~/.aws/credentials``, including ``AWS_ENDPOINT_URL`` for S3-compatible
  servers). Nothing here stores or prints them: locations are shown scrubbed.
- S3 waits are bounded: each connect and each read gives up after
  ``MMER_S3_TIMEOUT`` seconds (default 15) and a request is tried
  ``MMER_S3_ATTEMPTS`` times (default 3, botocore's standard retry mode, with
  no second retry loop in s3fs), so a frozen server fails a command in about
  a minute rather than seven. A server that does not answer, refuses the
  connection or rejects the credentials is reported naming the bucket
  (:class:`RemoteError`, exit 1), never as an internal error.
"""

from __future__ import annotations

import functools
import math
import os
import re
import uuid
from typing import Iterator

from mmer_cl.errors import MmerError
from storage.backends import MARKER_NAME, PAGE_SIZE, BackendError, paged, scrub_url

ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"}
NO_LISTING_CACHE = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
TEMP_PREFIX = ".tmp-"
KEEP_NAME = ".mmer-location"
ENV_TIMEOUT, DEFAULT_TIMEOUT = "MMER_S3_TIMEOUT", 15.0  # seconds, per connect and per read
ENV_ATTEMPTS, DEFAULT_ATTEMPTS = "MMER_S3_ATTEMPTS", 3  # tries of one request, the first included
S3_PROTOCOLS = ("s3", "s3a")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CREDENTIALS_ADVICE = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or ~/.aws/credentials) "
                      "in the environment of mmer")


class RemoteError(BackendError, MmerError):
    """The remote blob location failed during a command (unreachable, timed out, credentials refused)."""

    exit_code = 1


def s3_settings() -> tuple[float, int]:
    """``(timeout seconds, attempts)`` from ``MMER_S3_TIMEOUT`` / ``MMER_S3_ATTEMPTS`` (checked)."""
    raw_timeout, raw_attempts = os.environ.get(ENV_TIMEOUT, ""), os.environ.get(ENV_ATTEMPTS, "")
    try:
        timeout = float(raw_timeout) if raw_timeout.strip() else DEFAULT_TIMEOUT
    except ValueError:
        timeout = -1.0
    if not (math.isfinite(timeout) and 0 < timeout <= 3600):
        raise BackendError(f"{ENV_TIMEOUT}={raw_timeout!r} is not a number of seconds from 0 to 3600; "
                           f"unset it for the default ({DEFAULT_TIMEOUT:g} s)")
    try:
        attempts = int(raw_attempts) if raw_attempts.strip() else DEFAULT_ATTEMPTS
    except ValueError:
        attempts = 0
    if not 1 <= attempts <= 20:
        raise BackendError(f"{ENV_ATTEMPTS}={raw_attempts!r} is not a whole number from 1 to 20; unset it for "
                           f"the default ({DEFAULT_ATTEMPTS})")
    return timeout, attempts


def check_bucket_name(url: str) -> None:
    """Refuse an S3 URL whose bucket name S3 would refuse (3-63 lowercase letters, digits, '.', '-')."""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket):
        raise BackendError(f"{bucket!r} is not a valid S3 bucket name (3-63 characters: lowercase letters, digits, "
                           "'.' and '-', starting and ending with a letter or digit); check --objects "
                           "(MMER_OBJECTS), e.g. s3://my-bucket/mmer")


def _remote_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the remote side failing (network, timeout, server or credentials), not a bug."""
    module = type(exc).__module__ or ""
    return isinstance(exc, OSError) or module.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs"))


def _remote(what: str):
    """Turn a remote failure inside the decorated method into a :class:`RemoteError` naming the location."""
    def wrap(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (FileNotFoundError, BackendError):
                raise
            except Exception as exc:  # noqa: BLE001 - only remote failures are translated, the rest re-raised
                if not _remote_failure(exc):
                    raise
                raise RemoteError(self.unreachable(what, exc)) from None
        return call
    return wrap


class FsspecBackend:
    """Objects under ``URL/ab/cdef...`` on the fsspec filesystem of ``URL``."""

    def __init__(self, url: str, create: bool = False):
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec is a dependency of the extras
            raise BackendError("blob locations given as URLs need fsspec: pip install -e '.[s3]' in a clone of mmer-cl") from None
        self.location = scrub_url(url)
        if self.location != url:
            raise BackendError(f"credentials in a blob location URL are refused ({self.location}): they would end "
                               "up in shell history and logs; use the standard environment / config of the "
                               "filesystem (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                               "~/.aws/credentials)")
        protocol = url.split("://", 1)[0]
        options = {"use_listings_cache": False, "skip_instance_cache": True} if protocol in NO_LISTING_CACHE else {}
        self.timeout, self.attempts = s3_settings()
        if protocol in S3_PROTOCOLS:
            check_bucket_name(url)
            options["config_kwargs"] = {"connect_timeout": self.timeout, "read_timeout": self.timeout,
                                        "retries": {"max_attempts": self.attempts, "mode": "standard"}}
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError) as exc:
            extra = " (pip install -e '.[s3]' in a clone of mmer-cl)" if protocol in ("s3", "s3a") else ""
            raise BackendError(f"cannot open blob location {self.location}: {exc}{extra}") from None
        if protocol in S3_PROTOCOLS:
            self.fs.retries = 1  # botocore retries (above); s3fs's own loop would multiply them
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.atomic_put = any(p in ATOMIC_PUT_PROTOCOLS for p in protocols)
        self.buckets = any(p in NO_LISTING_CACHE for p in protocols)
        if not self._exists(self.root):
            if not create:
                raise BackendError(f"no blob location at {self.location}: check --objects (MMER_OBJECTS); "
                                   "only `mmer init` creates one")
            self._create()

    def unreachable(self, what: str, exc: BaseException) -> str:
        """The message for a remote failure while doing ``what``: which location, bucket and endpoint."""
        name = type(exc).__name__
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
        bucket = self.root.split("/", 1)[0]
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = f"bucket {bucket!r}" + (f" at {scrub_url(endpoint)}" if endpoint else "")
        if name in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError") \
                or "Unable to locate credentials" in text:
            return f"no credentials for the blob location {self.location} ({where}): {CREDENTIALS_ADVICE}."
        if isinstance(exc, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text \
                or "SignatureDoesNotMatch" in text:
            return (f"access to the blob location {self.location} ({where}) was denied ({text}); check the "
                    "credentials (" + CREDENTIALS_ADVICE + ") and the bucket's permissions.")
        timed_out = "timeout" in name.lower() or "timed out" in text.lower() or "timeout" in text.lower()
        cause = (f"no answer within {self.timeout:g} s ({self.attempts} attempt(s))" if timed_out
                 else f"{name}: {text}")
        return (f"cannot {what} the blob location {self.location} ({where}): {cause}. Check that the server is "
                f"up and reachable, then rerun (waits are set by {ENV_TIMEOUT} and {ENV_ATTEMPTS}). "
                "The store is unchanged or fully updated (writes are atomic).")

    def _exists(self, path: str) -> bool:
        try:
            return self.fs.exists(path)
        except Exception as exc:  # noqa: BLE001 - a remote failure becomes a message naming the location
            if not _remote_failure(exc) and not isinstance(exc, ValueError):
                raise
            raise BackendError(self.unreachable("reach", exc)) from None

    @_remote("create")
    def _create(self) -> None:
        """Make the location exist: on object stores a prefix exists once it holds an object."""
        bucket = self.root.split("/", 1)[0]
        if self.buckets and not self._exists(bucket):
            raise BackendError(f"the bucket of {self.location} does not exist; create it first "
                               "(mmer never creates buckets)")
        self.fs.makedirs(self.root, exist_ok=True)
        self._put(self._path(KEEP_NAME), b"mmer-cl blob location\n")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _put(self, path: str, data: bytes) -> None:
        if self.atomic_put:
            self.fs.pipe_file(path, data)
            return
        parent, name = path.rsplit("/", 1)
        tmp = f"{parent}/{TEMP_PREFIX}{uuid.uuid4().hex}-{name}"
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except BaseException:
            try:
                self.fs.rm_file(tmp)
            except (FileNotFoundError, OSError):
                pass
            raise

    @_remote("write to")
    def put(self, key: str, data: bytes) -> None:
        self._put(self._path(key), data)

    @_remote("read from")
    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    @_remote("read from")
    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    @_remote("read from")
    def size(self, key: str) -> int:
        return self.fs.size(self._path(key))

    @_remote("delete from")
    def delete(self, key: str) -> int:
        path = self._path(key)
        try:
            size = self.fs.size(path)
            self.fs.rm_file(path)
        except FileNotFoundError:
            return 0
        return size

    @_remote("list")
    def _ls(self, path: str) -> list[dict]:
        try:
            return self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []

    def list_pages(self, page_size: int = PAGE_SIZE) -> Iterator[list[tuple[str, int]]]:
        return paged(self._objects(), page_size)

    def _objects(self) -> Iterator[tuple[str, int]]:
        self.fs.invalidate_cache()
        prefixes = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._ls(self.root)
                          if e.get("type") == "directory")
        for prefix in prefixes:
            if len(prefix) != 2:
                continue
            for e in sorted(self._ls(f"{self.root}/{prefix}"), key=lambda e: e["name"]):
                name = e["name"].rstrip("/").rsplit("/", 1)[-1]
                if e.get("type") != "directory" and not name.startswith("."):
                    yield f"{prefix}/{name}", int(e.get("size") or 0)

    @_remote("clean")
    def remove_temps(self) -> int:
        if self.atomic_put:
            return 0
        n = 0
        for path in self.fs.glob(f"{self.root}/*/{TEMP_PREFIX}*"):
            self.fs.rm_file(path)
            n += 1
        return n

    @_remote("read from")
    def read_marker(self) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(MARKER_NAME))
        except FileNotFoundError:
            return None

    @_remote("write to")
    def write_marker(self, data: bytes) -> None:
        self._put(self._path(MARKER_NAME), data)
