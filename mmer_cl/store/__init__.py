"""The versioned store, class :class:`Store` (core.py), its methods in one module per verb.

register, expand (and remove), versions (aliases, tags, history), export (export, load, compose), audit (and gc),
report; beside them the logic they use: expansion plans, identity and manifests, locks, recipes, provenance, the
register-free pipeline. May import mmer_cl.method, checkpoints, compose, runtime, errors, registry and storage;
never mmer_cl.cli.
"""

from __future__ import annotations

import importlib

# Every name the old mmer_cl/store.py defined, and where it lives now; imported on first use, so importing a
# submodule (mmer_cl.store.locks, ...) does not load the whole store, and `from mmer_cl.store import Store,
# StoreError, RegisterResult` works as before.
_HOME = {
    "AuditMixin": "mmer_cl.store.audit",
    "AuditReport": "mmer_cl.store.records",
    "COMPOSE_READ_CACHE_BYTES": "mmer_cl.store.records",
    "DB_NAME": "mmer_cl.store.records",
    "DamagedBlob": "mmer_cl.store.records",
    "ENV_ACTOR": "mmer_cl.store.records",
    "ExpandMixin": "mmer_cl.store.expand",
    "ExpandResult": "mmer_cl.store.records",
    "ExportMixin": "mmer_cl.store.export",
    "GroupRunner": "mmer_cl.store.records",
    "LOCK_NAME": "mmer_cl.store.records",
    "MAX_RELATIVE_CHANGE": "mmer_cl.store.records",
    "RegisterMixin": "mmer_cl.store.register",
    "RegisterResult": "mmer_cl.store.records",
    "RegistryError": "mmer_cl.store.records",
    "ReportMixin": "mmer_cl.store.report",
    "Store": "mmer_cl.store.core",
    "StoreError": "mmer_cl.store.records",
    "VerifiedBase": "mmer_cl.store.records",
    "VersionsMixin": "mmer_cl.store.versions",
    "_merge_summary": "mmer_cl.store.records",
    "_merged_and_one_bit": "mmer_cl.store.records",
    "_skipped_files": "mmer_cl.store.records",
    "_summary": "mmer_cl.store.records",
    "default_actor": "mmer_cl.store.records",
    "validate_alias": "mmer_cl.store.records",
    "validate_codec": "mmer_cl.store.records",
    "validate_description": "mmer_cl.store.records",
    "validate_tags": "mmer_cl.store.records",
}
_SUBMODULES = frozenset({
    "audit", "bitdelta_entries", "core", "derived_masks", "expand", "expansion_plan", "export", "identity",
    "locks", "manifests", "pipeline", "provenance", "recipe", "records", "register", "report", "report_tables",
    "version_tables", "versions",
})

__all__ = [
    "AuditReport", "DamagedBlob", "ExpandResult", "RegisterResult", "RegistryError", "Store", "StoreError",
]


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None or name in _SUBMODULES:
        raise AttributeError(f"module 'mmer_cl.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
