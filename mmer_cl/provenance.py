"""Provenance of an export: safetensors ``__metadata__`` and a Hugging Face model card.

Every shard of an export carries, in its safetensors header, the store id
(when the store has one), the version, the entry and its revision, the merge
parameters and the mmer-cl version, so a checkpoint found on a disk says
where it came from. Beside the weights, a model card in Hugging Face's format
(YAML front matter with ``base_model``, ``tags: [merge, mmer]``,
``library_name: transformers``) describes the reconstruction and its recipe.

The card is written as ``README.md``, where the Hub expects it, unless the
registered checkpoint shipped its own ``README.md``: that one is the model's
own card and is kept as it was; mmer's card then goes to ``MMER_CARD.md``.
"""

from __future__ import annotations

import json

CARD = "README.md"
FALLBACK_CARD = "MMER_CARD.md"
PREFIX = "mmer."


def mmer_version() -> str:
    from mmer_cl import __version__

    return __version__


def card_name(existing_files) -> str:
    """Where the card goes: ``README.md`` unless the checkpoint ships one."""
    return FALLBACK_CARD if CARD in set(existing_files) else CARD


def export_metadata(*, version: int, params: dict, base_name: str, base_fingerprint: str,
                    entry: str | None = None, revision: int | None = None, use_mask: bool = True,
                    store_id: str | None = None) -> dict[str, str]:
    """The safetensors ``__metadata__`` entries (all strings, keys prefixed ``mmer.``)."""
    meta = {"mmer_cl_version": mmer_version(), "version": str(version), "params": json.dumps(params, sort_keys=True),
            "base": base_name, "base_fingerprint": base_fingerprint,
            "reconstruction": ("base + mask * merged" if use_mask else "base + merged (no mask)") if entry
            else "base + merged (text)"}
    if entry is not None:
        meta["entry"] = entry
        meta["entry_revision"] = str(revision or 1)
    if store_id:
        meta["store_id"] = store_id
    return {PREFIX + k: v for k, v in meta.items()}


def _front_matter(base_model: str, extra_tags: list[str]) -> str:
    import yaml

    data = {"base_model": base_model, "tags": ["merge", "mmer", *extra_tags], "library_name": "transformers"}
    return "---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n"


def model_card(*, metadata: dict[str, str], version, base_model: str, entry=None, recipe: str | None = None) -> str:
    """The card's Markdown: what this checkpoint is, how it was built (recipe), the version's members."""
    m = {k[len(PREFIX):]: v for k, v in metadata.items() if k.startswith(PREFIX)}
    params = json.loads(m["params"])
    tags = [entry.modality] if entry is not None else ["text"]
    lines = [_front_matter(base_model, tags)]
    if entry is not None:
        lines += [f"# {entry.label} (MMER reconstruction, store version {version.number})", "",
                  f"Entry `{entry.label}` (revision {entry.revision}, modality {entry.modality}, task {entry.task}) "
                  f"reconstructed by [mmer-cl](https://pypi.org/project/mmer-cl/) {m['mmer_cl_version']} as "
                  f"`{m['reconstruction']}` from the base `{m['base']}`, with the entry's own encoder and projector "
                  "kept unchanged. MMER merges the LLM task vectors of several fine-tunes of one base and keeps a "
                  "binary mask per fine-tune that picks the merged parameters it needs."]
        if entry.description:
            lines += ["", entry.description]
    else:
        lines += [f"# Merged text LLM (store version {version.number})", "",
                  f"The base `{m['base']}` plus the merged task vector of store version {version.number}, "
                  f"written by mmer-cl {m['mmer_cl_version']}."]
    if version.description:
        lines += ["", f"Version {version.number}: {version.description}"]
    lines += ["", "## Recipe", "", "```yaml"]
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
    return "\n".join(lines)
