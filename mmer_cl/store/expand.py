"""`Store.expand` and `Store.remove`: each makes a new version.

The methods of :class:`~mmer_cl.store.core.Store` for this verb, as a mixin class it inherits.
"""

from __future__ import annotations

import time
from typing import Sequence

from mmer_cl.checkpoints.checkpoint import Checkpoint
from mmer_cl.checkpoints.export import Progress
from mmer_cl.errors import MmerError
from mmer_cl.method import bitdelta
from mmer_cl.method.params import MergeParams
from mmer_cl.runtime.faults import fault_point
from mmer_cl.store.expansion_plan import commit_expansion, plan_expansion, run_plan
from mmer_cl.store.records import (ExpandResult, GroupRunner, StoreError, _merged_and_one_bit, default_actor,
                                   validate_description, validate_tags)
from registry import BaseRecord, EntryRecord, VersionRecord


class ExpandMixin:
    """`Store.expand` and `Store.remove`: each makes a new version."""

    # ---- expand / remove -----------------------------------------------------------------
    def expand(self, params: MergeParams | None = None, *, base: str | None = None, actor: str | None = None,
               progress: Progress | None = None, members: Sequence[str] | None = None, recipe: str | None = None,
               description: str = "", tags: dict | None = None, runner: GroupRunner | None = None,
               store_masks: bool = False) -> ExpandResult:
        """Merge every active entry (or the named ``members``) into a new version and move ``current`` to it.

        With ``ties`` and unchanged merge parameters, the merge folds only the
        entries new since the current version into its stored accumulators;
        every mask is recomputed. Parameters default to the current version's.
        ``recipe`` (YAML text, see :mod:`mmer_cl.store.recipe`), ``description`` and ``tags`` are stored with it.
        ``runner`` runs the tensor groups elsewhere (e.g.
        :class:`mmer_cl.distributed.ray_expand.RayRunner`); the version is
        committed here once every group has succeeded. ``mmer`` and ``emr`` masks are computed from each
        entry's task vector when read (see :mod:`mmer_cl.store.derived_masks`); ``store_masks`` writes them instead,
        as releases before 0.3 did.
        """
        base_rec = self.registry.base(base)
        tags = validate_tags(tags)
        validate_description(description)
        with self._lock():
            previous = self.registry.version(base_rec.id)
            params = params or (MergeParams.from_dict(previous.params) if previous else MergeParams())
            entries, one_bit = _merged_and_one_bit(self.registry.entries(base_rec.id))
            if not entries and one_bit:
                raise StoreError(f"nothing to merge: {', '.join(e.name for e in one_bit)} "
                                 f"{'is' if len(one_bit) == 1 else 'are'} stored as 1-bit deltas (--codec bitdelta), "
                                 "which are served without merging (`mmer export --entry NAME`); register a "
                                 "checkpoint without --codec to build a version")
            if not entries:
                raise StoreError("nothing to expand: no entries are registered; run `mmer register` first")
            if members is not None and set(members) & {e.name for e in one_bit}:
                raise StoreError(f"members {sorted(set(members) & {e.name for e in one_bit})} are stored as 1-bit "
                                 "deltas (--codec bitdelta) and are never merged; leave them out of --members")
            if members is not None:
                by_name = {e.name: e for e in entries}
                unknown = [m for m in members if m not in by_name]
                if unknown or not members:
                    raise StoreError(f"members {unknown or '[]'} are not active entries; active: "
                                     f"{', '.join(by_name)}")
                entries = [e for e in entries if e.name in set(members)]
            unknown = sorted(set(params.lam_per_entry) - {e.name for e in entries})
            if unknown:
                raise StoreError(f"per-entry lambda given for {', '.join(unknown)}, not among the members "
                                 f"({', '.join(e.name for e in entries)}); fix the names")
            if previous and [m.entry_id for m in previous.members] == [e.id for e in entries] \
                    and MergeParams.from_dict(previous.params) == params and not (recipe or description or tags):
                return ExpandResult(previous, False, False)
            return self._new_version(base_rec, entries, params, previous, actor or default_actor(), progress,
                                     recipe=recipe, description=description, tags=tags, runner=runner,
                                     store_masks=store_masks)

    def remove(self, name: str, *, base: str | None = None, actor: str | None = None,
               progress: Progress | None = None, runner: GroupRunner | None = None) -> VersionRecord | None:
        """Remove an entry: a new version without it (None when it was the last, or before any version).

        The new version holds exactly the current version's members less this one: an entry registered or
        updated since (pending its ``expand``) would enter it unasked, so then nothing is done and the
        message says to expand first. History stays.
        """
        base_rec = self.registry.base(base)
        actor = actor or default_actor()
        with self._lock():
            fault_point("remove.before")
            entry = self.registry.entry(base_rec.id, name)
            if not entry.active:
                raise StoreError(f"entry {name!r} was already removed")
            if entry.codec == bitdelta.BITDELTA:  # in no version: removed without re-merging anything
                self.registry.remove_entry(base_rec.id, name, actor)
                return self.registry.version(base_rec.id)
            rest, _ = _merged_and_one_bit(e for e in self.registry.entries(base_rec.id) if e.id != entry.id)
            previous = self.registry.version(base_rec.id)
            if not rest or previous is None:
                self.registry.remove_entry_without_version(base_rec.id, name, actor)
                return None
            held = {m.entry_id for m in previous.members}
            pending = [e for e in rest if e.id not in held]
            if pending:
                what = ", ".join(f"{e.label} revision {e.revision}" if e.revision > 1 else f"{e.label} (new)"
                                 for e in pending)
                raise StoreError(f"not removing {name!r}: the new version would also take in {what}, which the "
                                 f"current version {previous.number} does not hold. Run `mmer expand` first (it "
                                 f"makes a version with them), then `mmer remove {name}`")
            self._refuse_unreadable_references(name, rest)
            params = MergeParams.from_dict(previous.params) if previous else MergeParams()
            return self._new_version(base_rec, rest, params, previous, actor, progress, remove=name,
                                     runner=runner).version

    @staticmethod
    def _refuse_unreadable_references(name: str, rest: list[EntryRecord]) -> None:
        """Before any work: the remaining entries are merged again, so each one registered by reference must
        still be readable; name those that are not, and the way out (they can always be removed)."""
        gone: list[tuple[str, str]] = []
        for e in rest:
            if e.stats.get("referenced"):
                try:
                    Checkpoint(e.source_path)
                except MmerError as exc:
                    gone.append((e.label, str(exc)))
        if gone:
            named = "; ".join(f"{label!r} ({why})" for label, why in gone)
            raise StoreError(
                f"cannot remove {name!r} yet: the new version merges the remaining entries again, and entry "
                f"{named} was registered by reference and its checkpoint can no longer be read. Put it back at "
                f"its path, or remove it first (`mmer remove {gone[0][0]}`: that needs no source, and every "
                f"version so far still exports it), then remove {name!r}. Nothing was changed.")

    def _new_version(self, base_rec: BaseRecord, entries: list[EntryRecord], params: MergeParams,
                     previous: VersionRecord | None, actor: str, progress: Progress | None,
                     remove: str | None = None, runner: GroupRunner | None = None, store_masks: bool = False,
                     **annotations) -> ExpandResult:
        """Plan, run every tensor group (here, or through ``runner``), and commit
        (see :mod:`mmer_cl.store.expansion_plan`)."""
        started = time.perf_counter()
        plan = plan_expansion(self.registry, base_rec.id, entries, params, previous, self.blobs, store_masks)
        if runner is not None:  # a failure leaves only unreferenced blobs, which gc removes
            results = runner(self.blobs, plan, progress=progress)
            version = commit_expansion(self.registry, plan, results, actor, started, remove, **annotations)
            return ExpandResult(version, True, plan.incremental)
        with self.blobs.batch() as batch:
            results = run_plan(self.reader, batch.put, plan, self.device, progress)
            version = commit_expansion(self.registry, plan, results, actor, started, remove, **annotations)
        return ExpandResult(version, True, plan.incremental)
