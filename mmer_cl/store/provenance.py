"""Provenance of an export: safetensors ``__metadata__``, a Hugging Face model card and the recipe.

Every shard of an export carries, in its safetensors header, the store id
(when the store has one), the version, the entry and its revision, the merge
parameters, the mmer-cl version and the store format (the registry schema),
so a checkpoint found on a disk says where it came from. Beside the weights
go a model card (``huggingface_hub.ModelCard``: YAML front matter with
``base_model``, ``tags: [merge, mmer]``, ``library_name: transformers``) and
``mmer-recipe.yaml``, the version's recipe with every parameter spelled out,
which the card quotes and ``mmer expand --config`` re-runs.

The card is written as ``README.md``, where the Hub expects it, unless the
registered checkpoint (or adapter) shipped its own ``README.md``: that one is
the model's own card and is kept as it was; mmer's card then goes to
``MMER_CARD.md``.
"""

from __future__ import annotations

import json

CARD = "README.md"
FALLBACK_CARD = "MMER_CARD.md"
PREFIX = "mmer."
PROJECT = "mmer-cl"


def mmer_version() -> str:
    from mmer_cl import __version__

    return __version__


def store_format() -> int:
    """The store format an export records: the registry schema version (``mmer --version`` shows it)."""
    from registry.schema import SCHEMA_VERSION

    return SCHEMA_VERSION


def card_name(existing_files) -> str:
    """Where the card goes: ``README.md`` unless the checkpoint ships one."""
    return FALLBACK_CARD if CARD in set(existing_files) else CARD


def export_metadata(*, version: int, params: dict, base_name: str, base_fingerprint: str,
                    entry: str | None = None, revision: int | None = None, use_mask: bool = True,
                    store_id: str | None = None) -> dict[str, str]:
    """The safetensors ``__metadata__`` entries (all strings, keys prefixed ``mmer.``)."""
    meta = {"mmer_cl_version": mmer_version(), "store_format": str(store_format()), "version": str(version),
            "params": json.dumps(params, sort_keys=True), "base": base_name, "base_fingerprint": base_fingerprint,
            "reconstruction": ("base + mask * merged" if use_mask else "base + merged (no mask)") if entry
            else "base + merged (text)"}
    if entry is not None:
        meta["entry"] = entry
        meta["entry_revision"] = str(revision or 1)
    if store_id:
        meta["store_id"] = store_id
    return {PREFIX + k: v for k, v in meta.items()}


def _has_own_side(entry) -> bool:
    """Whether the entry brought tensors of its own (an encoder, a projector): a text-only LoRA has none."""
    stats = getattr(entry, "stats", None) or {}
    return bool(stats.get("own_params", 1))


def model_card(*, metadata: dict[str, str], version, base_model: str, entry=None, recipe: str | None = None) -> str:
    """The card's Markdown: what this checkpoint is, how it was built (the recipe), the version's members."""
    from huggingface_hub import ModelCard, ModelCardData

    m = {k[len(PREFIX):]: v for k, v in metadata.items() if k.startswith(PREFIX)}
    params = json.loads(m["params"])
    data = ModelCardData(base_model=base_model, tags=["merge", "mmer", entry.modality if entry is not None else "text"],
                         library_name="transformers")
    lines = []
    if entry is not None:
        kept = (" with the entry's own encoder and projector kept unchanged" if _has_own_side(entry)
                else "; the entry changes the LLM only (no encoder or projector of its own)")
        lines += [f"# {entry.label} (MMER reconstruction, store version {version.number})", "",
                  f"Entry `{entry.label}` (revision {entry.revision}, modality {entry.modality}, task {entry.task}) "
                  f"reconstructed by {PROJECT} {m['mmer_cl_version']} as `{m['reconstruction']}` from the base "
                  f"`{m['base']}`{kept}. MMER merges the LLM task vectors of several fine-tunes of one base and "
                  "keeps a binary mask per fine-tune that picks the merged parameters it needs."]
        if entry.description:
            lines += ["", entry.description]
    else:
        lines += [f"# Merged text LLM (store version {version.number})", "",
                  f"The base `{m['base']}` plus the merged task vector of store version {version.number}, "
                  f"written by {PROJECT} {m['mmer_cl_version']}."]
    if version.description:
        lines += ["", f"Version {version.number}: {version.description}"]
    lines += ["", "## Recipe", "",
              "The file `mmer-recipe.yaml` beside this card; in a store holding the same base and entries, "
              "`mmer expand --config mmer-recipe.yaml` builds this version again, bit for bit:", "", "```yaml"]
    if recipe:
        lines.append(recipe.rstrip())
    else:
        import yaml

        lines.append(yaml.safe_dump({"members": [mb.entry_name for mb in version.members], **params},
                                    sort_keys=False).rstrip())
    lines += ["```", "", f"## Members of version {version.number}", "",
              "| entry | revision | mask density |", "|---|---:|---:|"]
    lines += [f"| {mb.entry_name} | {mb.revision} | {mb.mask_density:.1%} |" for mb in version.members]
    lines += ["", "## Provenance", ""]
    lines += [f"- {k}: `{v}`" for k, v in m.items() if k != "params"]
    lines += [f"- version created: {version.created_at:%Y-%m-%d %H:%M} UTC",  # not the export time: reproducible
              "", "The same facts are in every weight file's safetensors metadata (keys `mmer.*`).", ""]
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n" + "\n".join(lines))
    return str(card)


def export_files(*, metadata: dict[str, str], version, base_model: str, entry=None, files=()) -> dict[str, bytes]:
    """The files an export gets beside its weights: the model card and ``mmer-recipe.yaml`` (which it quotes)."""
    from mmer_cl.store.recipe import RECIPE_FILE, version_recipe

    m = {k[len(PREFIX):]: v for k, v in metadata.items() if k.startswith(PREFIX)}
    info = {"mmer_cl_version": m["mmer_cl_version"], "store_format": int(m["store_format"]), "base": m["base"],
            "base_fingerprint": m["base_fingerprint"], "version": version.number}
    recipe = version_recipe(version, info=info)
    card = model_card(metadata=metadata, version=version, base_model=base_model, entry=entry, recipe=recipe)
    return {card_name(files): card.encode(), RECIPE_FILE: recipe.encode()}
