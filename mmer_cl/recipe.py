"""Expansion recipes: a YAML file that says how a version is built (``mmer expand --config recipe.yaml``).

Example::

    # recipe.yaml
    method: ties            # ties | task_arithmetic | average | dare_ties
    density: 0.5
    alpha: 1.0
    mask_rule: mmer         # mmer | emr | consensus
    lambda: 1.0
    members: [vision, audio, speaker]   # default: every active entry
    lambda_per_entry:       # optional: a mask lambda per entry, overriding `lambda`
      speaker: 0.8
    description: three modalities, speaker mask loosened
    tags: {stage: staging}

Keys left out take MergeParams' defaults (not the current version's), so a
recipe alone says how its version was built. The text is stored with the
version and printed by ``mmer show``. Parsed with ``yaml.safe_load`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmer_cl.errors import ConfigError
from mmer_cl.params import MergeParams

PARAM_KEYS = {"method": "method", "density": "density", "alpha": "alpha", "mask_rule": "mask_rule",
              "lambda": "lam", "lam": "lam", "k": "k", "seed": "seed", "lambda_per_entry": "lam_per_entry"}
OTHER_KEYS = ("members", "description", "tags")


@dataclass
class Recipe:
    params: MergeParams
    members: list[str] | None = None
    description: str = ""
    tags: dict = field(default_factory=dict)
    text: str = ""


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    """A :class:`Recipe` from YAML text; unknown keys and bad values are refused with the fix."""
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping (key: value lines), got {type(data).__name__}")
    unknown = sorted(set(data) - set(PARAM_KEYS) - set(OTHER_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; allowed: "
                          f"{', '.join(list(PARAM_KEYS) + list(OTHER_KEYS))}")
    if "lam" in data and "lambda" in data:
        raise ConfigError(f"{source} gives both lambda and lam; keep one")
    kwargs = {PARAM_KEYS[k]: v for k, v in data.items() if k in PARAM_KEYS}
    if not isinstance(kwargs.get("lam_per_entry", {}), dict):
        raise ConfigError(f"{source}: lambda_per_entry must map entry names to numbers, e.g. {{audio: 0.8}}")
    try:
        params = MergeParams(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    members = data.get("members")
    if members is not None and (not isinstance(members, list) or not all(isinstance(m, str) for m in members)):
        raise ConfigError(f"{source}: members must be a list of entry names, e.g. [vision, audio]")
    tags = data.get("tags") or {}
    if not isinstance(tags, dict):
        raise ConfigError(f"{source}: tags must be a mapping, e.g. {{stage: staging}}")
    return Recipe(params, members, str(data.get("description") or ""), {str(k): str(v) for k, v in tags.items()},
                  text)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
    return parse_recipe(text, str(path))
