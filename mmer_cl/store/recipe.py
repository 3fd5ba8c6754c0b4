"""Expansion recipes: a YAML file that says how a version is built (``mmer expand --config recipe.yaml``).

Example::

    # recipe.yaml
    method: ties            # ties | task_arithmetic | average | dare_ties
    density: 0.5
    alpha: 1.0
    mask_rule: mmer         # mmer | emr | consensus
    tie_rule: hash          # hash | earliest: which magnitudes tied at the trim threshold are kept
    lambda: 1.0
    members: [vision, audio, speaker]   # default: every active entry
    lambda_per_entry:       # optional: a mask lambda per entry, overriding `lambda`
      speaker: 0.8
    description: three modalities, speaker mask loosened
    tags: {stage: staging}

Keys left out take MergeParams' defaults (not the current version's), so a
recipe alone says how its version was built. The text is stored with the
version and printed by ``mmer show``. Parsed with ``yaml.safe_load`` only.

Every field of :class:`~mmer_cl.method.params.MergeParams` is a key, under its own
name (``lam`` and ``lam_per_entry`` also as ``lambda`` and
``lambda_per_entry``): a field added to MergeParams is accepted and written
without a change here. Every export carries its version's recipe, all
parameters spelled out, as ``mmer-recipe.yaml`` (:func:`version_recipe`);
``mmer expand --config mmer-recipe.yaml`` rebuilds that version bit for bit.
The keys are checked by a pydantic model built from MergeParams' fields; the
values' ranges by MergeParams itself.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mmer_cl.errors import ConfigError
from mmer_cl.method.params import MergeParams

RECIPE_FILE = "mmer-recipe.yaml"
SPELLED = {"lam": "lambda", "lam_per_entry": "lambda_per_entry"}  # a field -> the name recipes write
OTHER_KEYS = ("members", "description", "tags")
INFO_KEYS = ("mmer_cl_version", "store_format", "base", "base_fingerprint", "version")  # provenance, see Recipe


@dataclass
class Recipe:
    params: MergeParams
    members: list[str] | None = None
    description: str = ""
    tags: dict = field(default_factory=dict)
    text: str = ""
    info: dict = field(default_factory=dict)  # provenance an exported recipe carries (INFO_KEYS)


def param_keys() -> list[str]:
    """The recipe keys of MergeParams' fields, as recipes write them."""
    return [SPELLED.get(f.name, f.name) for f in dataclasses.fields(MergeParams)]


def _model():
    """A pydantic model of a recipe: one optional key per MergeParams field (under both spellings), the
    other keys, nothing else."""
    from pydantic import AliasChoices, ConfigDict, Field, create_model

    hints = typing.get_type_hints(MergeParams)
    fields: dict = {}
    for f in dataclasses.fields(MergeParams):
        kind = hints.get(f.name, typing.Any)
        if kind is dict:
            kind = dict[str, float]
        names = [SPELLED[f.name], f.name] if f.name in SPELLED else [f.name]
        fields[f.name] = (typing.Optional[kind], Field(None, validation_alias=AliasChoices(*names)))
    fields["members"] = (typing.Optional[list[str]], None)
    fields["description"] = (typing.Optional[str], None)
    fields["tags"] = (typing.Optional[dict[str, typing.Union[str, int, float, bool]]], None)
    for key in INFO_KEYS:
        fields[key] = (typing.Any, None)
    config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)
    return create_model("RecipeFile", __config__=config, **fields)


def _explain(source: str, exc) -> ConfigError:
    """A pydantic ValidationError as one message that says what to fix."""
    unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden"]
    if unknown:
        allowed = [*param_keys(), *OTHER_KEYS]
        return ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    problems = []
    for e in exc.errors():
        key = ".".join(str(p) for p in e["loc"])
        hint = {"members": "a list of entry names, e.g. [vision, audio]",
                "tags": "a mapping, e.g. {stage: staging}",
                "lam_per_entry": "a mapping of entry names to numbers, e.g. {audio: 0.8}",
                "lambda_per_entry": "a mapping of entry names to numbers, e.g. {audio: 0.8}"}.get(
                    str(e["loc"][0]), e["msg"].lower())
        problems.append(f"{key} must be {hint}, got {e.get('input')!r}" if str(e["loc"][0]) in
                        ("members", "tags", "lam_per_entry", "lambda_per_entry") else f"{key}: {hint}")
    return ConfigError(f"{source}: " + "; ".join(problems))


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    """A :class:`Recipe` from YAML text; unknown keys and bad values are refused with the fix."""
    import yaml
    from pydantic import ValidationError

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping (key: value lines), got {type(data).__name__}")
    for field_name, spelled in SPELLED.items():
        if field_name in data and spelled in data:
            raise ConfigError(f"{source} gives both {spelled} and {field_name}; keep one")
    try:
        checked = _model().model_validate({str(k): v for k, v in data.items()})
    except ValidationError as exc:
        raise _explain(source, exc) from None
    kwargs = {f.name: getattr(checked, f.name) for f in dataclasses.fields(MergeParams)
              if getattr(checked, f.name) is not None}
    params = MergeParams(**kwargs)  # ranges and choices: MergeParams' own checks (ConfigError)
    tags = {str(k): str(v) for k, v in (checked.tags or {}).items()}
    info = {key: getattr(checked, key) for key in INFO_KEYS if getattr(checked, key) is not None}
    return Recipe(params, checked.members, checked.description or "", tags, text, info)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
    return parse_recipe(text, str(path))


def version_recipe(version, *, info: dict | None = None) -> str:
    """The YAML recipe that rebuilds ``version`` (a VersionRecord): every parameter it recorded, spelled out
    (a default that changes in a later release cannot change what it builds), and its members.

    ``info`` (mmer-cl version, store format, base) follows the parameters; ``mmer expand --config`` checks
    that the store's base has the recorded fingerprint and reads nothing else of it.
    """
    import yaml

    params = MergeParams.from_dict(version.params)
    data = {SPELLED.get(k, k): v for k, v in dataclasses.asdict(params).items()}
    data["members"] = [m.entry_name for m in version.members]
    if version.description:
        data["description"] = version.description
    lines = [f"# How store version {version.number} was built; rebuild it with "
             f"`mmer expand --config {RECIPE_FILE}`",
             "# in a store holding the same base and entries (see `mmer entries`)."]
    text = "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)
    if info:
        text += "# provenance: the base must match; the rest is for people\n" + yaml.safe_dump(info, sort_keys=False)
    return text
