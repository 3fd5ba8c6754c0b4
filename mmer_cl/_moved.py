"""Old module paths, kept importable for one release (0.3): ``import mmer_cl.merging`` still works.

Importing an old path warns (DeprecationWarning, naming the new path) and gives the very module of the new
path, so ``mmer_cl.merging is mmer_cl.method.merging`` and patching either patches both. One finder on
``sys.meta_path`` (installed by ``mmer_cl/__init__``) serves the whole table; remove this module in 0.4.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

REMOVED_IN = "0.4"

MOVED = {
    'mmer_cl.accumulators': 'mmer_cl.method.accumulators',
    'mmer_cl.adapters': 'mmer_cl.compose.adapters',
    'mmer_cl.bitdelta': 'mmer_cl.method.bitdelta',
    'mmer_cl.bitdelta_entries': 'mmer_cl.store.bitdelta_entries',
    'mmer_cl.checkpoint': 'mmer_cl.checkpoints.checkpoint',
    'mmer_cl.confinement': 'mmer_cl.checkpoints.confinement',
    'mmer_cl.derived_masks': 'mmer_cl.store.derived_masks',
    'mmer_cl.device': 'mmer_cl.runtime.device',
    'mmer_cl.dtypes': 'mmer_cl.checkpoints.dtypes',
    'mmer_cl.entry': 'mmer_cl.cli.entry',
    'mmer_cl.expansion': 'mmer_cl.method.expansion',
    'mmer_cl.expansion_plan': 'mmer_cl.store.expansion_plan',
    'mmer_cl.export': 'mmer_cl.checkpoints.export',
    'mmer_cl.export_guard': 'mmer_cl.checkpoints.export_guard',
    'mmer_cl.failures': 'mmer_cl.runtime.failures',
    'mmer_cl.faults': 'mmer_cl.runtime.faults',
    'mmer_cl.fingerprint': 'mmer_cl.runtime.fingerprint',
    'mmer_cl.fused': 'mmer_cl.method.fused',
    'mmer_cl.hub': 'mmer_cl.checkpoints.hub',
    'mmer_cl.identity': 'mmer_cl.store.identity',
    'mmer_cl.interrupts': 'mmer_cl.runtime.interrupts',
    'mmer_cl.keymap': 'mmer_cl.checkpoints.keymap',
    'mmer_cl.locks': 'mmer_cl.store.locks',
    'mmer_cl.lora': 'mmer_cl.checkpoints.lora',
    'mmer_cl.manifests': 'mmer_cl.store.manifests',
    'mmer_cl.masks': 'mmer_cl.method.masks',
    'mmer_cl.merging': 'mmer_cl.method.merging',
    'mmer_cl.names': 'mmer_cl.runtime.names',
    'mmer_cl.params': 'mmer_cl.method.params',
    'mmer_cl.pipeline': 'mmer_cl.store.pipeline',
    'mmer_cl.precision': 'mmer_cl.method.precision',
    'mmer_cl.prefetch': 'mmer_cl.runtime.prefetch',
    'mmer_cl.progress': 'mmer_cl.runtime.progress',
    'mmer_cl.provenance': 'mmer_cl.store.provenance',
    'mmer_cl.recipe': 'mmer_cl.store.recipe',
    'mmer_cl.reconstruct': 'mmer_cl.method.reconstruct',
    'mmer_cl.references': 'mmer_cl.checkpoints.references',
    'mmer_cl.report': 'mmer_cl.store.report_tables',
    'mmer_cl.table': 'mmer_cl.runtime.table',
    'mmer_cl.task_vector': 'mmer_cl.method.task_vector',
    'mmer_cl.threads': 'mmer_cl.runtime.threads',
    'mmer_cl.versions': 'mmer_cl.store.version_tables',
    'mmer_cl.write_behind': 'mmer_cl.runtime.write_behind',
    'mmer_cl.writer': 'mmer_cl.checkpoints.writer',
}


def _stacklevel() -> int:
    """Point the warning at the line that imported the old path (warnings skips the import system's own
    ``_bootstrap`` frames by itself; ``importlib.import_module``'s frame is stepped over here)."""
    frame, level = sys._getframe(2), 2
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:
            frame = frame.f_back
        elif os.path.basename(name) == "__init__.py" and os.path.basename(os.path.dirname(name)) == "importlib":
            frame, level = frame.f_back, level + 1
        else:
            break
    return level


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new
        self.module = None

    def create_module(self, spec):
        warnings.warn(f"{self.old} moved to {self.new}; the old path goes away in {REMOVED_IN}",
                      DeprecationWarning, stacklevel=_stacklevel())
        self.module = importlib.import_module(self.new)
        self.spec = self.module.__spec__
        return self.module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # the import system set the old name's spec on it: give the module its own back


class MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(fullname, new))


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())
