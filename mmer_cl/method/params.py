"""The parameters of one expansion, validated once, stored with every version."""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field

from mmer_cl.errors import ConfigError
from mmer_cl.method.masks import MASK_RULES
from mmer_cl.method.merging import MERGE_METHODS, TIE_RULES


MAX_SEED = 2**63 - 1


def finite_number(value, label: str) -> float:
    """``value`` if it is a finite int or float (not a bool: YAML's ``true`` is no number), else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{label} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{label} must be a finite number, got {value!r}")
    return value


def integer(value, label: str) -> int:
    """``value`` if it is an int (not a bool, not a float), else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label} must be an integer, got {value!r}")
    return value


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
    tie_rule: which magnitudes tied at a trim threshold are kept (``ties``): ``hash`` (default) by a
        seeded hash of the position, ``earliest`` the first by position (every version recorded before
        the rule was; :meth:`from_dict` gives it to them). See :class:`mmer_cl.method.merging.TrimThreshold`.
    """

    method: str = "ties"
    density: float = 0.2
    alpha: float = 1.0
    mask_rule: str = "mmer"
    lam: float = 1.0
    k: int = 2
    seed: int = 0
    lam_per_entry: dict = field(default_factory=dict)
    tie_rule: str = "hash"

    def __post_init__(self) -> None:
        """Every parameter checked here, whatever its source (CLI, recipe, Python API, a stored version)."""
        if self.method not in MERGE_METHODS:
            raise ConfigError(f"unknown merge method {self.method!r}; choose one of {sorted(MERGE_METHODS)}")
        if self.mask_rule not in MASK_RULES:
            raise ConfigError(f"unknown mask rule {self.mask_rule!r}; choose one of {list(MASK_RULES)}")
        if self.tie_rule not in TIE_RULES:
            raise ConfigError(f"unknown tie rule {self.tie_rule!r}; choose one of {list(TIE_RULES)}")
        density = finite_number(self.density, "density")
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"density must be in (0, 1] (the fraction of each task vector kept), got {density}")
        if not finite_number(self.alpha, "alpha") > 0:
            raise ConfigError(f"alpha must be > 0 (it scales the merged vector), got {self.alpha}")
        if finite_number(self.lam, "lambda") < 0:
            raise ConfigError(f"lambda must be >= 0, got {self.lam}")
        if integer(self.k, "k") < 1:
            raise ConfigError(f"consensus k must be >= 1, got {self.k}")
        if not 0 <= integer(self.seed, "seed") <= MAX_SEED:
            raise ConfigError(f"seed must be an integer from 0 to {MAX_SEED}, got {self.seed}")
        if not isinstance(self.lam_per_entry, dict):
            raise ConfigError(f"lambda_per_entry must map entry names to numbers, got {self.lam_per_entry!r}")
        for name, lam in self.lam_per_entry.items():
            if not isinstance(name, str):
                raise ConfigError(f"lambda_per_entry names entries by name, got the key {name!r}")
            if finite_number(lam, f"lambda of entry {name!r} (lambda_per_entry)") < 0:
                raise ConfigError(f"lambda of entry {name!r} (lambda_per_entry) must be a number >= 0, got {lam!r}")

    def __hash__(self) -> int:
        return hash((self.method, self.density, self.alpha, self.mask_rule, self.lam, self.k, self.seed,
                     tuple(sorted(self.lam_per_entry.items())), self.tie_rule))

    def lam_for(self, entry: str) -> float:
        """The mask lambda of one entry: its own from ``lam_per_entry``, else ``lam``."""
        return float(self.lam_per_entry.get(entry, self.lam))

    @property
    def incremental(self) -> bool:
        """Whether an expansion can fold new models into stored accumulators."""
        return self.method == "ties"

    def merge_key(self) -> tuple:
        """Parameters the merged vector depends on; accumulators are reusable while they match."""
        return (self.method, self.density, self.seed, self.tie_rule)

    def tensor_seed(self, tensor_name: str) -> int:
        """A per-tensor seed, stable across runs and tensor order."""
        return (self.seed * 1_000_003 + zlib.crc32(tensor_name.encode())) % (2**31)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MergeParams":
        """The parameters a version recorded; one recorded before the tie rule was kept ``earliest``."""
        d = {"tie_rule": "earliest", **d}
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
