"""The Python API a lifelong-learning pipeline imports: a versioned MMER store.

A store is a directory with a registry database and a blob store::

    store = Store.init("my-store", base="llama-base/")
    store.register("llava-vision/", name="vision", modality="vision", task="vqa")
    store.register("qwen-audio/", name="audio", modality="audio", task="asr")
    v = store.expand()                     # merge + masks, a new immutable version
    model = store.load("vision")           # base + mask * merged, ready to run
    store.rollback(1)                      # current -> version 1, nothing deleted

Registering stores the entry's task vector (fine-tuned minus base, per LLM
tensor), its modality-side tensors and its non-weight files, compressed and
content-addressed, so the source checkpoint may be deleted afterwards. The
base is referenced by path and every base tensor is checked against its
recorded sha256 whenever it is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import ContextManager, Iterable

import torch
from sqlalchemy.exc import SQLAlchemyError

from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.checkpoints.dtypes import refuse_unmergeable
from mmer_cl.checkpoints.export import Progress, TensorSource
from mmer_cl.checkpoints.writer import fsync_dir
from mmer_cl.errors import MmerError, StoreDamagedError
from mmer_cl.runtime.device import default_device
from mmer_cl.runtime.fingerprint import checkpoint_fingerprint, tensor_digest
from mmer_cl.runtime.names import validate_actor, validate_name
from mmer_cl.store import identity, manifests
from mmer_cl.store.audit import AuditMixin
from mmer_cl.store.expand import ExpandMixin
from mmer_cl.store.export import ExportMixin
from mmer_cl.store.locks import export_lock, writer_lock, writer_lock_now
from mmer_cl.store.records import DB_NAME, LOCK_NAME, StoreError, VerifiedBase, default_actor
from mmer_cl.store.register import RegisterMixin
from mmer_cl.store.report import ReportMixin
from mmer_cl.store.versions import VersionsMixin
from registry import BaseRecord, BaseTensor, BlobRef, Registry, sqlite_url
from registry.postgres import normalise_url
from registry.registry import shown_url
from registry.urls import check_url, scrub
from storage import BlobError, BlobStore, TensorReader


class Store(RegisterMixin, ExpandMixin, VersionsMixin, ExportMixin, AuditMixin, ReportMixin):
    """A registry and a blob location; see the module docstring.

    By default both live in the directory ``root`` (``registry.db``,
    ``objects/``). ``url`` puts the registry elsewhere (any SQLAlchemy URL;
    ``postgresql://`` for one shared by many hosts) and ``objects`` the
    blobs (a directory or an fsspec URL such as ``s3://bucket/prefix``).
    """

    def __init__(self, root: str | Path, url: str | None = None, device: torch.device | None = None, *,
                 objects: str | Path | None = None, create: bool = False):
        """Open the store at ``root``; the identity checks of :mod:`mmer_cl.store.identity` run first.

        ``create=True`` (used by :meth:`init`) may create the registry and the blob location, but only
        where no store data exists.
        """
        self.root = Path(root)
        url = normalise_url(url or sqlite_url(self.root / DB_NAME))  # remembers its password: never shown
        problem = check_url(url)
        if problem:
            raise StoreError(problem + "; write it like sqlite:////path/registry.db or "
                             "postgresql://user@host:5432/dbname (--db-url / MMER_DB_URL)")
        try:
            self.blobs = BlobStore.open(objects, create=create) if objects else BlobStore(self.root, create=create)
        except BlobError as exc:
            raise StoreError(str(exc)) from None
        try:
            found = identity.check_before_open(self.blobs, url, str(identity.sqlite_path(url) or shown_url(url)),
                                               create)
        except MmerError as exc:  # its message may quote the URL or a driver's error: never its password
            scrubbed = scrub(str(exc), (url,))
            if scrubbed == str(exc):
                raise
            raise type(exc)(scrubbed) from None
        try:
            self.registry = Registry(url)
        except SQLAlchemyError as exc:
            raise StoreDamagedError(f"cannot open the registry {shown_url(url)}: {str(exc).splitlines()[0]}. "
                                    + identity.restore_advice(shown_url(url))) from None
        try:
            self.store_id = identity.settle(self.blobs, self.registry, found, self._lock)
        except BaseException:
            self.registry.close()
            raise
        self.registry.describer = manifests.ManifestWriter(self.blobs)  # every new row gets its manifest
        manifests.ensure(self.registry, self.blobs, lambda: writer_lock_now(  # an earlier release's rows get theirs
            self.registry.engine, self._lock_file(), self.store_id))
        self.reader = TensorReader(self.blobs)
        self.device = device or default_device()

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, url: str | None = None, *, objects: str | Path | None = None,
             **kw) -> "Store":
        """An existing store: ``root`` holds the SQLite registry and ``objects/`` unless ``url`` (a
        SQLAlchemy URL, e.g. ``postgresql://host/db``) or ``objects`` (a directory or URL such as
        ``s3://bucket/prefix``) say otherwise. Nothing is created: a mistyped location is an error."""
        root = Path(root)
        if url is None and not root.is_dir():
            raise StoreError(f"no mmer store at {root}; create one with `mmer init --base PATH` "
                             "(or Store.init) or point --store / MMER_STORE at an existing one")
        if url is None and not (root / DB_NAME).exists() and not (root / "objects").exists():
            raise StoreError(f"no mmer store at {root} (no {DB_NAME}); create one with `mmer init --base PATH` "
                             "(or Store.init) or point --store / MMER_STORE at an existing one")
        return cls(root, url, objects=objects, **kw)

    @classmethod
    def init(cls, root: str | Path, base: str | Path, base_name: str | None = None, actor: str | None = None,
             url: str | None = None, progress: Progress | None = None, *, objects: str | Path | None = None,
             **kw) -> "Store":
        """Create a store (or add a base to one) and record the base model's fingerprint.

        A base the store already holds (same tensors) is recognised, not added twice:
        ``store.init_created`` is then False and ``store.init_result`` the existing base.
        Giving it a second name is refused, since every command would then have to ask which base.
        ``objects`` (a directory or URL) is the blob location to create, when not ``root/objects``.
        """
        root = Path(root)
        chosen = base_name
        base_name = validate_name(base_name or Path(base).resolve().name, "base name")
        actor = validate_actor(actor) if actor else None  # refused before the base is read, not after
        ckpt = Checkpoint(base)
        refuse_unmergeable({n: i.dtype for n, i in ckpt.infos.items() if i.is_float}, f"base {base}")
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} is a file, not a store directory; choose another --store")
        tensors = []
        for i, (name, info) in enumerate(ckpt.infos.items(), start=1):
            t = ckpt.get(name)
            tensors.append(BaseTensor(name, info.shape, info.dtype, tensor_digest(t)))
            if progress:
                progress(i, len(ckpt.infos), name)
        fingerprint = checkpoint_fingerprint((t.name, t.shape, t.dtype, t.sha256) for t in tensors)
        if url is None or objects is None:  # something lives in the store directory
            root.mkdir(parents=True, exist_ok=True)
        store = cls(root, url, objects=objects, create=True, **kw)
        if root.is_dir():
            fsync_dir(root)
        with store._lock():
            same = next((b for b in store.registry.bases() if b.fingerprint == fingerprint), None)
            if same is not None:
                if chosen is not None and chosen != same.name:
                    store.close()
                    raise StoreError(
                        f"{root} already holds this base model (same tensors) as {same.name!r}; a second name "
                        f"for it would make every command ask for --base. Keep using {same.name!r} (no need to "
                        "init again), or create a separate store with --store OTHER_DIR.")
                store.init_result, store.init_created = same, False
                return store
            store.init_result = store.registry.add_base(base_name, str(Path(base).resolve()), fingerprint, tensors,
                                                        actor or default_actor())
            store.init_created = True
        return store

    def close(self) -> None:
        self.registry.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lock(self) -> ContextManager[None]:
        """One writer at a time per store (readers are never blocked), across hosts where the registry is
        shared: a PostgreSQL advisory lock there, a file lock beside a SQLite registry. Once the store is
        open, whoever holds it first writes the manifests an earlier release's rows lack."""
        lock = writer_lock(self.registry.engine, self._lock_file(), self.registry.meta_value("store_id"))
        if self.registry.describer is None:  # still opening: identity not settled yet
            return lock
        return manifests.described_under(lock, self.registry, self.blobs)

    def _export_lock(self) -> ContextManager[None]:
        """Held shared by every export while it writes, so that gc leaves its partial directory alone."""
        return export_lock(self.registry.engine, self._export_lock_file(), self.store_id)

    def _export_lock_file(self) -> Path:
        lock = self._lock_file()
        return lock.with_name(lock.name + "-export")

    def _lock_file(self) -> Path:
        """Beside the SQLite database: ``root/.lock`` for the default ``root/registry.db``, else ``DB.lock``,
        so every client of one database shares it whatever its working directory."""
        db = self.registry.engine.url.database if self.registry.engine.dialect.name == "sqlite" else None
        if not db or db == ":memory:" or Path(db).resolve() == (self.root / DB_NAME).resolve():
            return self.root / LOCK_NAME
        return Path(db).with_name(Path(db).name + ".lock")

    def base(self, name: str | None = None) -> BaseRecord:
        return self.registry.base(name)

    def blob_source(self, refs: Iterable[BlobRef]) -> TensorSource:
        """Tensors by key from blob rows, read (checksum-verified) and decoded on demand."""
        digests = {r.key: r.digest for r in refs}
        return lambda key: self.reader.tensor(digests[key], key)

    def _verified_base(self, base: BaseRecord) -> VerifiedBase:
        return VerifiedBase(base, self.registry.base_tensors(base.id))
