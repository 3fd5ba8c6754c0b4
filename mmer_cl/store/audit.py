"""`Store.audit` and `Store.gc`: checking every blob, removing unreferenced ones.

The methods of :class:`~mmer_cl.store.core.Store` for this verb, as a mixin class it inherits.
"""

from __future__ import annotations

import dataclasses

from mmer_cl.checkpoints.export import Progress
from mmer_cl.checkpoints.export_guard import GRACE_SECONDS, remove_leftovers
from mmer_cl.checkpoints.references import TensorReference, read_task_vector
from mmer_cl.errors import MmerError
from mmer_cl.store import identity, manifests
from mmer_cl.store.expansion_plan import task_vector_sources
from mmer_cl.store.locks import no_export_running
from mmer_cl.store.records import AuditReport, DamagedBlob, default_actor
from registry import BaseRecord


class AuditMixin:
    """`Store.audit` and `Store.gc`: checking every blob, removing unreferenced ones."""

    # ---- maintenance ---------------------------------------------------------------------
    def audit(self, check_base: bool = False, progress: Progress | None = None) -> AuditReport:
        """Verify the database, every referenced blob and every row's references (and, optionally, the base).

        A damaged blob is reported with every owner, down to the tensor: ``version 3 mask of entry vision,
        tensor model.layers.0.q_proj.weight``.
        """
        database_problems = identity.database_problems(self.registry)
        described = manifests.check(self.registry, self.blobs)
        owners = self.registry.blob_owners(detailed=True)
        damaged = []
        for step, digest in enumerate(sorted(owners), start=1):
            problem = self.blobs.verify(digest)
            if problem:
                damaged.append(DamagedBlob(digest, problem, owners[digest]))
            if progress:
                progress(step, len(owners), digest[:12])
        base_problems = []
        if check_base:
            for b in self.registry.bases():
                try:
                    vbase = self._verified_base(b)
                    for name in vbase.tensors:
                        vbase.get(name)
                except MmerError as exc:
                    base_problems.append(str(exc))
                base_problems += self._check_references(b)
        live = manifests.reachable(self.registry, self.blobs) | set(owners)
        unreferenced = sum(1 for d in self.blobs.digests() if d not in live)
        return AuditReport(len(owners), damaged, self.registry.dangling_references(), base_problems, unreferenced,
                           database_problems, described.problems, described.undescribed)

    def _check_references(self, base: BaseRecord) -> list[str]:
        """Problems with the checkpoints that entries registered by reference point at."""
        problems, opened = [], {}
        for entry in self.registry.entries(base.id):
            if not entry.stats.get("referenced"):
                continue
            try:
                for spec in task_vector_sources(self.registry, self.blobs, base.id, entry).values():
                    read_task_vector(TensorReference.from_spec(spec), opened)
            except MmerError as exc:
                problems.append(f"entry {entry.name}: {exc}")
        return problems

    def gc(self, actor: str | None = None):
        """Delete blobs no manifest or row reaches and partial exports (left by crashes); logged in the audit trail.

        Refused unless the registry and the blob location carry the same store id (see
        :mod:`mmer_cl.store.identity`), so a lost or swapped registry can never make gc delete real data, and
        refused while the rows differ from their manifests (see :mod:`mmer_cl.store.manifests`). The partial
        directory of a running export is left alone (see :mod:`mmer_cl.checkpoints.export_guard`).
        """
        with self._lock():
            identity.verify(self.blobs, self.registry, self.store_id)
            keep = manifests.live_or_refuse(self.registry, self.blobs, identity.restore_advice(
                str(identity.sqlite_path(self.registry.url) or self.registry.url)))
            result = self.blobs.gc(keep)
            with no_export_running(self.registry.engine, self._export_lock_file(), self.store_id) as idle:
                partial = sum(remove_leftovers(t, 0.0 if idle else GRACE_SECONDS) for t in self.export_targets())
            result = dataclasses.replace(result, partial_exports=partial)
            self.registry.record(actor or default_actor(), "gc", "objects", "", f"-{result.removed} blobs",
                                 {"removed": result.removed, "freed_bytes": result.freed_bytes,
                                  "temp_files": result.temp_files, "partial_exports": partial})
        return result
