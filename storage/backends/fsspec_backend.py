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
"""

from __future__ import annotations

import uuid
from typing import Iterator

from storage.backends import MARKER_NAME, PAGE_SIZE, BackendError, paged, scrub_url

ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"}
NO_LISTING_CACHE = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
TEMP_PREFIX = ".tmp-"
KEEP_NAME = ".mmer-location"


class FsspecBackend:
    """Objects under ``URL/ab/cdef...`` on the fsspec filesystem of ``URL``."""

    def __init__(self, url: str, create: bool = False):
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec is a dependency of the extras
            raise BackendError("blob locations given as URLs need fsspec: pip install 'mmer-cl[s3]'") from None
        self.location = scrub_url(url)
        if self.location != url:
            raise BackendError(f"credentials in a blob location URL are refused ({self.location}): they would end "
                               "up in shell history and logs; use the standard environment / config of the "
                               "filesystem (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                               "~/.aws/credentials)")
        protocol = url.split("://", 1)[0]
        options = {"use_listings_cache": False, "skip_instance_cache": True} if protocol in NO_LISTING_CACHE else {}
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError) as exc:
            extra = " (pip install 'mmer-cl[s3]')" if protocol in ("s3", "s3a") else ""
            raise BackendError(f"cannot open blob location {self.location}: {exc}{extra}") from None
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.atomic_put = any(p in ATOMIC_PUT_PROTOCOLS for p in protocols)
        self.buckets = any(p in NO_LISTING_CACHE for p in protocols)
        if not self._exists(self.root):
            if not create:
                raise BackendError(f"no blob location at {self.location}: check --objects (MMER_OBJECTS); "
                                   "only `mmer init` creates one")
            self._create()

    def _exists(self, path: str) -> bool:
        try:
            return self.fs.exists(path)
        except PermissionError:
            raise BackendError(f"access to {self.location} was denied; check the credentials in the standard "
                               "environment / config of that filesystem") from None
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot reach blob location {self.location}: {type(exc).__name__}: {exc}") from None

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

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            if self.fs.size(path) == len(data):
                return False
        except FileNotFoundError:
            pass
        self._put(path, data)
        return True

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def size(self, key: str) -> int:
        return self.fs.size(self._path(key))

    def delete(self, key: str) -> int:
        path = self._path(key)
        try:
            size = self.fs.size(path)
            self.fs.rm_file(path)
        except FileNotFoundError:
            return 0
        return size

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

    def remove_temps(self) -> int:
        if self.atomic_put:
            return 0
        n = 0
        for path in self.fs.glob(f"{self.root}/*/{TEMP_PREFIX}*"):
            self.fs.rm_file(path)
            n += 1
        return n

    def read_marker(self) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(MARKER_NAME))
        except FileNotFoundError:
            return None

    def write_marker(self, data: bytes) -> None:
        self._put(self._path(MARKER_NAME), data)
