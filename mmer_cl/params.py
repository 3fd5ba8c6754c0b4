"""The parameters of one expansion, validated once, stored with every version."""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field

from mmer_cl.errors import ConfigError
from mmer_cl.masks import MASK_RULES
from mmer_cl.merging import MERGE_METHODS


@dataclass(frozen=True)
class MergeParams:
    """How task vectors are merged and masks computed.

    method: ``ties`` (default), ``task_arithmetic``, ``average`` or ``dare_ties``.
    density: fraction of each task vector kept by trimming (ties, dare_ties).
    alpha: scale of the merged vector.
    mask_rule: ``mmer`` (default), ``emr`` or ``consensus``.
    lam: lambda of the ``mmer`` rule (smaller keeps more parameters).
    k: how many models must agree, for ``consensus``.
    seed: seed of ``dare_ties``'s random drop.
    lam_per_entry: lambda for named entries, overriding ``lam`` for them (mask rules ``mmer`` and ``consensus``).
    """

    method: str = "ties"
    density: float = 0.2
    alpha: float = 1.0
    mask_rule: str = "mmer"
    lam: float = 1.0
    k: int = 2
    seed: int = 0
    lam_per_entry: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise ConfigError(f"unknown merge method {self.method!r}; choose one of {sorted(MERGE_METHODS)}")
        if self.mask_rule not in MASK_RULES:
            raise ConfigError(f"unknown mask rule {self.mask_rule!r}; choose one of {list(MASK_RULES)}")
        for field_name in ("density", "alpha", "lam"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                label = "lambda" if field_name == "lam" else field_name
                raise ConfigError(f"{label} must be a finite number, got {value!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or isinstance(self.seed, bool) \
                or not isinstance(self.seed, int):
            raise ConfigError(f"k and seed must be integers, got k={self.k!r}, seed={self.seed!r}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0 (it scales the merged vector), got {self.alpha}")
        if self.lam < 0:
            raise ConfigError(f"lambda must be >= 0, got {self.lam}")
        if self.k < 1:
            raise ConfigError(f"consensus k must be >= 1, got {self.k}")
        for name, lam in self.lam_per_entry.items():
            if not isinstance(lam, (int, float)) or lam < 0:
                raise ConfigError(f"lambda of entry {name!r} must be a number >= 0, got {lam!r}")

    def __hash__(self) -> int:
        return hash((self.method, self.density, self.alpha, self.mask_rule, self.lam, self.k, self.seed,
                     tuple(sorted(self.lam_per_entry.items()))))

    def lam_for(self, entry: str) -> float:
        """The mask lambda of one entry: its own from ``lam_per_entry``, else ``lam``."""
        return float(self.lam_per_entry.get(entry, self.lam))

    @property
    def incremental(self) -> bool:
        """Whether an expansion can fold new models into stored accumulators."""
        return self.method == "ties"

    def merge_key(self) -> tuple:
        """Parameters the merged vector depends on; accumulators are reusable while they match."""
        return (self.method, self.density, self.seed)

    def tensor_seed(self, tensor_name: str) -> int:
        """A per-tensor seed, stable across runs and tensor order."""
        return (self.seed * 1_000_003 + zlib.crc32(tensor_name.encode())) % (2**31)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MergeParams":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
