"""Versions, entries, aliases, tags, descriptions, `show`, `diff` and the audit log's history.

The methods of :class:`~mmer_cl.store.core.Store` for this verb, as a mixin class it inherits.
"""

from __future__ import annotations

from typing import Sequence

from mmer_cl.runtime.faults import fault_point
from mmer_cl.store.records import StoreError, default_actor, validate_alias, validate_description, validate_tags
from registry import CURRENT, ENTRY, VERSION, EntryRecord, EventRecord, VersionRecord


class VersionsMixin:
    """Versions, entries, aliases, tags, descriptions, `show`, `diff` and the audit log's history."""

    # ---- versions ------------------------------------------------------------------------
    def entries(self, include_removed: bool = False, base: str | None = None) -> list[EntryRecord]:
        return self.registry.entries(self.registry.base(base).id, include_removed)

    def versions(self, base: str | None = None) -> list[VersionRecord]:
        return self.registry.versions(self.registry.base(base).id)

    def version(self, ref: int | str | None = None, base: str | None = None) -> VersionRecord:
        v = self.registry.version(self.registry.base(base).id, ref)
        if v is None:
            raise StoreError("no current version: run `mmer expand` after registering entries")
        return v

    def rollback(self, version: int | str, *, base: str | None = None, actor: str | None = None) -> tuple[str, str]:
        """Point ``current`` at an earlier (or later) version (``3``, ``"v3"`` or an alias); nothing is deleted."""
        base_rec = self.registry.base(base)
        with self._lock():
            fault_point("rollback.before")
            return self.registry.set_alias(base_rec.id, CURRENT, version, actor or default_actor())

    # ---- aliases, tags, descriptions (MLflow-style registry conventions) -------------------
    def set_alias(self, name: str, version: int | str, *, base: str | None = None,
                  actor: str | None = None) -> tuple[str, str]:
        """Point alias ``name`` (e.g. ``production``) at a version; ``current`` moves like :meth:`rollback`."""
        validate_alias(name)
        base_rec = self.registry.base(base)
        with self._lock():
            return self.registry.set_alias(base_rec.id, name, version, actor or default_actor())

    def remove_alias(self, name: str, *, base: str | None = None, actor: str | None = None) -> str:
        """Delete alias ``name`` (not ``current``); versions are untouched. Returns what it pointed at."""
        base_rec = self.registry.base(base)
        with self._lock():
            return self.registry.remove_alias(base_rec.id, name, actor or default_actor())

    def aliases(self, base: str | None = None) -> dict[str, int | None]:
        return self.registry.aliases(self.registry.base(base).id)

    def _target(self, entry: str | None, version: int | str | None, base: str | None) -> tuple[str, int, str]:
        if entry is not None and version is not None:
            raise StoreError("name either an entry or a version, not both")
        base_rec = self.registry.base(base)
        if entry is not None:
            e = self.registry.entry(base_rec.id, entry)
            return ENTRY, e.id, f"entry {e.name}"
        v = self.version(version, base)
        return VERSION, v.id, f"version {v.number}"

    def tag(self, tags: dict | None = None, *, remove: Sequence[str] = (), entry: str | None = None,
            version: int | str | None = None, base: str | None = None, actor: str | None = None) -> dict:
        """Set (and ``remove``) key=value tags on an entry or a version (default: current); returns them all."""
        kind, target_id, label = self._target(entry, version, base)
        with self._lock():
            return self.registry.set_tags(kind, target_id, label, validate_tags(tags), list(remove),
                                          actor or default_actor())

    def describe(self, text: str, *, entry: str | None = None, version: int | str | None = None,
                 base: str | None = None, actor: str | None = None) -> None:
        """Set the description of an entry or a version (default: current)."""
        validate_description(text)
        kind, target_id, label = self._target(entry, version, base)
        with self._lock():
            self.registry.set_description(kind, target_id, label, text, actor or default_actor())

    def show(self, version: int | str | None = None, base: str | None = None) -> dict:
        """One version in full: members, parameters, mask densities, sizes, recipe (see :mod:`mmer_cl.store.version_tables`)."""
        from mmer_cl.store.version_tables import show_version

        return show_version(self, self.version(version, base))

    def diff(self, a: int | str, b: int | str, base: str | None = None) -> dict:
        """What changed from version ``a`` to version ``b`` (see :mod:`mmer_cl.store.version_tables`)."""
        from mmer_cl.store.version_tables import diff_versions

        return diff_versions(self.show(a, base), self.show(b, base))

    def history(self, limit: int | None = None) -> list[EventRecord]:
        return self.registry.events(limit)
