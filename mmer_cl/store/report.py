"""`Store.report`: the storage cost of a version against the baselines.

The methods of :class:`~mmer_cl.store.core.Store` for this verb, as a mixin class it inherits.
"""

from __future__ import annotations

from typing import Sequence

from mmer_cl.checkpoints.export import Progress


class ReportMixin:
    """`Store.report`: the storage cost of a version against the baselines."""

    def report(self, version: int | str | None = None, base: str | None = None, ranks: Sequence[int] = (8, 16, 64),
               svd: bool = True, progress: Progress | None = None) -> dict:
        """Storage cost of a version against full copies and LoRA baselines (see :mod:`mmer_cl.store.report_tables`)."""
        from mmer_cl.store.report_tables import storage_report

        return storage_report(self, self.version(version, base), self.registry.base(base), ranks, svd, progress)
