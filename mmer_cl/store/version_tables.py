"""One version in full (`mmer show`) and what changed between two (`mmer diff`).

Reads the registry only (sizes are the blob rows' byte counts); no tensor
is decoded, so both are instant on any store.
"""

from __future__ import annotations

from mmer_cl.runtime.table import Right, human_bytes as _human, render_table


def show_version(store, v) -> dict:
    """Members (revision, modality, task, mask density, sizes), parameters, sizes, recipe, tags, aliases."""
    blobs = store.registry.version_blobs(v.id)
    by_role: dict[str, int] = {}
    mask_bytes: dict[int, int] = {}
    for b in blobs:
        role = "accumulators" if b.role.startswith("acc.") else b.role
        by_role[role] = by_role.get(role, 0) + b.stored_bytes
        if b.role == "mask" and b.entry_id is not None:
            mask_bytes[b.entry_id] = mask_bytes.get(b.entry_id, 0) + b.stored_bytes
    derived = v.details.get("masks") == "derived"  # computed on read from the task vector (mmer_cl.store.derived_masks)
    members = []
    for m in v.members:
        e = store.registry.entry_by_id(m.entry_id)
        own = sum(r.stored_bytes for r in store.registry.entry_blobs(e.id) if r.role in ("own", "aux"))
        tv = sum(r.stored_bytes for r in store.registry.entry_blobs(e.id, "task_vector"))
        members.append({"entry": m.entry_name, "revision": m.revision, "modality": e.modality, "task": e.task,
                        "mask_density": m.mask_density, "scale": m.scale, "mask_bytes": mask_bytes.get(e.id, 0),
                        "mask_storage": "stored" if e.id in mask_bytes or not derived else "derived",
                        "modality_side_bytes": own, "task_vector_bytes": tv, "source": e.source_path,
                        "description": e.description, "tags": e.tags})
    return {"version": v.number, "created_at": v.created_at, "created_by": v.created_by, "aliases": v.aliases,
            "description": v.description, "tags": v.tags, "params": v.params, "details": v.details,
            "members": members,
            "sizes": {"merged_bytes": by_role.get("merged", 0), "accumulator_bytes": by_role.get("accumulators", 0),
                      "mask_bytes": by_role.get("mask", 0), "version_bytes": sum(by_role.values()),
                      "modality_side_bytes": sum(m["modality_side_bytes"] for m in members)},
            "recipe": v.recipe}


def diff_versions(a: dict, b: dict) -> dict:
    """Members added, removed or updated (a new revision), parameter changes, mask density changes per entry."""
    ma = {m["entry"]: m for m in a["members"]}
    mb = {m["entry"]: m for m in b["members"]}
    keys = sorted(set(a["params"]) | set(b["params"]))
    params = {k: [a["params"].get(k), b["params"].get(k)] for k in keys if a["params"].get(k) != b["params"].get(k)}
    return {
        "from": a["version"], "to": b["version"],
        "added": [n for n in mb if n not in ma],
        "removed": [n for n in ma if n not in mb],
        "updated": [{"entry": n, "from_revision": ma[n]["revision"], "to_revision": mb[n]["revision"]}
                    for n in mb if n in ma and ma[n]["revision"] != mb[n]["revision"]],
        "params": params,
        "mask_density": {n: [ma[n]["mask_density"], mb[n]["mask_density"]] for n in mb if n in ma},
    }


def format_show(d: dict) -> str:
    p = d["params"]
    lines = [f"version {d['version']}" + (f" ({', '.join(d['aliases'])})" if d["aliases"] else "")
             + f"  created {d['created_at']:%Y-%m-%d %H:%M} by {d['created_by']}"]
    if d["description"]:
        lines.append(f"description: {d['description']}")
    if d["tags"]:
        lines.append("tags: " + ", ".join(f"{k}={v}" for k, v in d["tags"].items()))
    lines.append("parameters: " + ", ".join(f"{k}={v}" for k, v in p.items() if k != "lam_per_entry" or v))
    how = "incremental" if d["details"].get("incremental") else "from all task vectors"
    lines.append(f"merge: {how}; read {', '.join(d['details'].get('merge_read', [])) or '-'}")
    phases = d["details"].get("phase_seconds")
    if phases and "seconds" in d["details"]:
        lines.append(f"took {d['details']['seconds']:.1f} s: reading task vectors and the previous version "
                     f"{phases['read']:.1f} s (on a second thread), merge and masks {phases['merge_and_masks']:.1f} s, "
                     f"coding the results {phases['code']:.1f} s")
    lines.append("")
    rows = [[m["entry"], Right(f"r{m['revision']}"), m["modality"], m["task"], Right(f"{m['mask_density']:.1%}"),
             Right(f"{m['scale']:.3g}"),
             Right("derived" if m.get("mask_storage") == "derived" else _human(m["mask_bytes"])),
             Right(_human(m["modality_side_bytes"]))]
            for m in d["members"]]
    lines.append(render_table(["entry", "rev", "modality", "task", "mask", "scale", "mask size", "own size"], rows))
    s = d["sizes"]
    lines.append("")
    lines.append(f"sizes: merged {_human(s['merged_bytes'])}, accumulators {_human(s['accumulator_bytes'])}, "
                 f"masks {_human(s['mask_bytes'])}; modality sides {_human(s['modality_side_bytes'])}")
    lines.append("recipe:" + ("\n" + "\n".join("  " + r for r in d["recipe"].rstrip().splitlines())
                              if d["recipe"] else " none (parameters given on the command line)"))
    return "\n".join(lines)


def format_diff(d: dict) -> str:
    lines = [f"v{d['from']} -> v{d['to']}"]
    lines.append("members added: " + (", ".join(d["added"]) or "none"))
    lines.append("members removed: " + (", ".join(d["removed"]) or "none"))
    if d["updated"]:
        lines.append("members updated: " + ", ".join(f"{u['entry']} r{u['from_revision']} -> r{u['to_revision']}"
                                                     for u in d["updated"]))
    if d["params"]:
        lines.append("parameters: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in d["params"].items()))
    else:
        lines.append("parameters: unchanged")
    if d["mask_density"]:
        rows = [[n, Right(f"{a:.1%}"), Right(f"{b:.1%}"), Right(f"{(b - a) * 100:+.1f} pt")]
                for n, (a, b) in d["mask_density"].items()]
        lines.append("")
        lines.append(render_table(["entry", f"mask v{d['from']}", f"mask v{d['to']}", "change"], rows))
    return "\n".join(lines)
