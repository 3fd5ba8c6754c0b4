"""The modality registry (SQLAlchemy): bases, entries, versions, aliases, audit log. Knows nothing of tensors."""

from registry.records import (BaseRecord, BaseTensor, BlobRef, EntryRecord, EventRecord, Member, Trim,
                              VersionRecord)
from registry.registry import CURRENT, ENTRY, VERSION, Registry, RegistryError, sqlite_url, version_number
from registry.schema import SCHEMA_VERSION

__all__ = ["CURRENT", "ENTRY", "SCHEMA_VERSION", "VERSION", "BaseRecord", "BaseTensor", "BlobRef", "EntryRecord",
           "EventRecord", "Member", "Registry", "RegistryError", "Trim", "VersionRecord", "sqlite_url",
           "version_number"]
