"""Storage cost of a version, against the baselines a user would otherwise pick.

What a deployment of MMER keeps: the base (shared), the merged vector, one
mask per entry, and each entry's modality side (encoder, projector, extra
vocabulary rows, config files). The accumulators and the task-vector archive
only serve later expansions and are reported apart.

Baselines, for the same entries:

* full copies: each fine-tuned checkpoint stored whole (its own dtype);
* LoRA adapters of rank r on every linear layer of the LLM (2-D weights other
  than embeddings and ``lm_head``): exactly ``r * (in + out)`` parameters
  each, in the base's dtype, plus the same modality side as MMER;
* LoRA *extracted* from each task vector by truncated SVD at rank r, with its
  relative reconstruction error ``||tau - tau_r||_F / ||tau||_F`` over those
  linear layers, next to MMER's own error ``||tau - s * m * tau_*|| / ||tau||``
  on the same layers, so size and fidelity are compared honestly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from mmer_cl.export import Progress
from mmer_cl.dtypes import ITEM_BYTES, is_float_code
from mmer_cl.table import human_bytes  # noqa: F401 (also re-exported for older imports)

if TYPE_CHECKING:
    from mmer_cl.store import Store
    from registry import BaseRecord, VersionRecord

EXACT_SVD_MAX_DIM = 2048


def binary_entropy(p: float) -> float:
    """H(p) in bits: the least a mask of density p can cost per parameter."""
    if p <= 0 or p >= 1:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def is_linear(name: str, shape: Sequence[int]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name


def lora_params(shapes: Sequence[Sequence[int]], rank: int) -> int:
    return sum(rank * (s[0] + s[1]) for s in shapes)


def singular_values(t: torch.Tensor, k: int) -> tuple[torch.Tensor, bool]:
    """The top ``k`` singular values; exact up to EXACT_SVD_MAX_DIM, randomized above (returns exact flag)."""
    if min(t.shape) <= EXACT_SVD_MAX_DIM:
        return torch.linalg.svdvals(t)[:k], True
    _, s, _ = torch.svd_lowrank(t, q=min(k + 16, min(t.shape)), niter=4)
    return s[:k], False


def _blob_total(refs) -> tuple[int, int]:
    return sum(r.stored_bytes for r in refs), sum(r.raw_bytes for r in refs)


def blob_closure(store: "Store", digests) -> set[str]:
    """``digests`` and every blob their decoding reads, transitively."""
    seen: set[str] = set()
    todo = list(digests)
    while todo:
        d = todo.pop()
        if d not in seen:
            seen.add(d)
            todo.extend(store.reader.links(d))
    return seen


def du_bytes(path: Path) -> int:
    """What ``du -sb`` counts: the apparent size of every file and directory below ``path``."""
    total = path.lstat().st_size
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _transient(path: Path) -> bool:
    """SQLite's shared-memory index of an open database: it exists while a connection (this one) is open."""
    return path.name.endswith("-shm")


def disk_usage(store: "Store") -> dict:
    """Every byte under the store directory, by what it holds (adds up to ``du -sb`` once no process has the
    registry open: SQLite's ``-shm`` index, which lives only while a connection is open, is left out)."""
    reg = store.registry
    kinds: dict[str, str] = {}
    for b in reg.bases():
        for e in reg.entries(b.id, include_removed=True):
            for r in reg.entry_blobs(e.id):
                kinds.setdefault(r.digest, {"task_vector": "task_vectors", "own": "modality_sides", "aux":
                                            "non_weight_files", "reference": "references"}.get(r.role,
                                                                                                "other_entry_blobs"))
        for v in reg.versions(b.id):
            for r in reg.version_blobs(v.id):
                kind = "masks" if r.role == "mask" else "merged" if r.role == "merged" else "legacy_accumulators"
                kinds.setdefault(r.digest, kind)
    usage = {k: 0 for k in ("task_vectors", "references", "merged", "masks", "legacy_accumulators", "modality_sides",
                            "non_weight_files", "other_entry_blobs", "unreferenced_blobs")}
    files = 0
    for page in store.blobs.pages():  # sizes come with the listing: no request per blob on a bucket
        for digest, size in page:
            usage[kinds.get(digest, "unreferenced_blobs")] += size
            files += size
    reg.checkpoint()  # the log's rows into the database file: what remains once this process closes it
    db_files = [p for p in store.root.glob("registry.db*") if p.is_file()]
    registry = sum(p.stat().st_size for p in db_files if not _transient(p))
    blobs_inside = Path(store.blobs.location) == (store.root / "objects").absolute()
    if blobs_inside and store.root.is_dir():  # the default layout: everything under one directory
        total = du_bytes(store.root) - sum(p.stat().st_size for p in db_files if _transient(p))
        usage["directories_and_other"] = total - files - registry
    else:  # blobs in a bucket or another directory, registry perhaps in a database server
        db = reg.engine.url.database if reg.engine.dialect.name == "sqlite" else None
        if db and db != ":memory:" and not registry:
            registry = sum(p.stat().st_size for p in Path(db).parent.glob(Path(db).name + "*") if p.is_file())
        total = files + registry
        usage["directories_and_other"] = 0
    usage["registry"] = registry
    usage["total"] = total
    return usage


def storage_report(store: "Store", version: "VersionRecord", base: "BaseRecord", ranks: Sequence[int],
                   svd: bool, progress: Progress | None = None) -> dict:
    reg = store.registry
    base_tensors = reg.base_tensors(base.id)
    llm = [t for t in base_tensors if is_float_code(t.dtype)]
    n_params = sum(math.prod(t.shape) for t in llm)
    base_bytes = sum(math.prod(t.shape) * ITEM_BYTES[t.dtype] for t in base_tensors)
    linear = {t.name: t.shape for t in llm if is_linear(t.name, t.shape)}
    base_item = ITEM_BYTES[llm[0].dtype] if llm else 2

    blobs = reg.version_blobs(version.id)
    needed = blob_closure(store, {b.digest for b in blobs if b.role in ("merged", "mask")})
    mask_owner = {r.digest: r.entry_id for v in reg.versions(base.id) for r in reg.version_blobs(v.id, "mask")}
    size = {d: store.blobs.size(d) for d in needed}
    merged_stored = sum(n for d, n in size.items() if d not in mask_owner)
    merged_raw = sum(b.raw_bytes for b in blobs if b.role == "merged")
    acc_stored, _ = _blob_total(b for b in blobs if b.role.startswith("acc."))
    entries = []
    for step, m in enumerate(version.members, start=1):
        entry = reg.entry_by_id(m.entry_id)
        mask_stored = sum(n for d, n in size.items() if mask_owner.get(d) == m.entry_id)
        own = reg.entry_blobs(m.entry_id, "own") + reg.entry_blobs(m.entry_id, "aux")
        tv_stored, _ = _blob_total(reg.entry_blobs(m.entry_id, "task_vector"))
        row = {
            "name": m.entry_name, "modality": entry.modality, "task": entry.task,
            "mask_bytes": mask_stored, "mask_density": m.mask_density,
            "mask_bits_per_param": 8 * mask_stored / n_params if n_params else 0.0,
            "mask_entropy_bound": binary_entropy(m.mask_density), "scale": m.scale,
            "modality_side_bytes": _blob_total(own)[0], "modality_side_raw_bytes": _blob_total(own)[1],
            "task_vector_archive_bytes": tv_stored,
            "task_vector_bits_per_param": 8 * tv_stored / n_params if n_params else 0.0,
            "full_copy_bytes": entry.stats.get("checkpoint_bytes", 0),
            "referenced": bool(entry.stats.get("referenced")),
        }
        if svd:
            row["fidelity"] = _fidelity(store, version, m, entry.id, linear, ranks)
        entries.append(row)
        if progress:
            progress(step, len(version.members), m.entry_name)

    side = sum(e["modality_side_bytes"] for e in entries)
    masks = sum(e["mask_bytes"] for e in entries)
    adapter = lora_params(list(linear.values()), 1) * base_item
    lora = {str(r): {"adapter_bytes_each": r * adapter,
                     "total_bytes": base_bytes + side + len(entries) * r * adapter} for r in ranks}
    usage = disk_usage(store)
    deployment = {"base": base_bytes, "merged": merged_stored, "masks": masks, "modality_sides": side,
                  "total": base_bytes + merged_stored + masks + side}
    remerge = {"task_vectors": usage["task_vectors"] + usage["references"],
               "other_versions": usage["merged"] + usage["masks"] + usage["legacy_accumulators"]
               - merged_stored - masks,
               "registry": usage["registry"]}
    return {
        "version": version.number, "params": version.params, "llm_params": n_params,
        "linear_layers": len(linear), "base_bytes": base_bytes,
        "merged_bytes": merged_stored, "merged_raw_bytes": merged_raw,
        "accumulator_bytes": acc_stored, "entries": entries,
        "mmer_total_bytes": deployment["total"],
        "full_copies_total_bytes": sum(e["full_copy_bytes"] for e in entries),
        "lora": lora,
        "deployment": deployment, "remerge": remerge, "on_disk": usage,
        "store_total_with_base_bytes": usage["total"] + base_bytes,
    }


def _fidelity(store: "Store", version: "VersionRecord", member, entry_id: int, linear: dict,
              ranks: Sequence[int]) -> dict:
    """Relative errors over the linear layers: SVD-LoRA at each rank, and MMER's reconstruction."""
    reg = store.registry
    tv = store.blob_source(reg.entry_blobs(entry_id, "task_vector"))
    merged = store.blob_source(reg.version_blobs(version.id, "merged"))
    masks = store.blob_source(r for r in reg.version_blobs(version.id, "mask") if r.entry_id == entry_id)
    total = 0.0
    mmer_err = 0.0
    svd_err = {r: 0.0 for r in ranks}
    exact = True
    for key in linear:
        tau = tv(key).to(store.device)
        norm2 = float(tau.square().sum())
        total += norm2
        approx = member.scale * masks(key).to(store.device) * merged(key).to(store.device)
        mmer_err += float((tau - approx).square().sum())
        s, was_exact = singular_values(tau, max(ranks))
        exact &= was_exact
        for r in ranks:
            svd_err[r] += max(norm2 - float(s[:r].square().sum()), 0.0)
    rel = (lambda e: math.sqrt(e / total) if total else 0.0)
    return {"mmer_relative_error": rel(mmer_err), "svd_exact": exact,
            "svd_lora_relative_error": {str(r): rel(e) for r, e in svd_err.items()}}


def format_report(r: dict) -> str:
    """The report as text tables for the terminal."""
    p, hb = r["params"], human_bytes
    n = len(r["entries"])
    disk, dep, keep = r["on_disk"], r["deployment"], r["remerge"]
    lines = [
        f"version {r['version']}: {p['method']} (density {p['density']}, alpha {p['alpha']}), "
        f"masks {p['mask_rule']} (lambda {p['lam']}); {r['llm_params']:,} LLM parameters, {n} entries",
        "", f"On disk: {hb(disk['total'])} " + ("(what `du -sb` counts for the store directory)"
                                                if disk.get("directories_and_other") else
                                                "(blobs at their location, plus the registry database file)"),
    ]
    labels = [("task_vectors", "task vectors (kept to re-merge later)"),
              ("references", "references to checkpoints kept elsewhere"), ("merged", "merged vectors, all versions"),
              ("masks", "masks, all versions"), ("modality_sides", "modality sides (encoders, projectors)"),
              ("non_weight_files", "non-weight files (configs, tokenizers)"),
              ("legacy_accumulators", "accumulators (stores from mmer-cl 0.1)"),
              ("other_entry_blobs", "other entry blobs"), ("unreferenced_blobs", "unreferenced (run `mmer gc`)"),
              ("registry", "registry database"), ("directories_and_other", "directories, lock, markers")]
    lines += [f"  {label:<44}{hb(disk[key]):>12}" for key, label in labels if disk.get(key)]
    full = r["full_copies_total_bytes"]
    lines += ["", f"Serving version {r['version']} (base counted once where it is shared):",
              f"  {'MMER: base + merged + masks + modality sides':<52}{hb(dep['total']):>12}",
              f"    {'base (referenced, not copied)':<50}{hb(dep['base']):>12}",
              f"    {'merged vector':<50}{hb(dep['merged']):>12}",
              f"    {'masks':<50}{hb(dep['masks']):>12}",
              f"    {'modality sides':<50}{hb(dep['modality_sides']):>12}",
              f"  {f'{n} full fine-tuned copies':<52}{hb(full):>12}"]
    for rank, lo in r["lora"].items():
        label = f"LoRA rank {rank} on {r['linear_layers']} linear layers (+ base, sides)"
        lines.append(f"  {label:<52}{hb(lo['total_bytes']):>12}")
    lines += ["", "Kept only to re-merge later (full copies keep nothing extra; LoRA adapters cannot re-merge):",
              f"  {'task vectors':<52}{hb(keep['task_vectors']):>12}",
              f"  {'other versions (history, rollback)':<52}{hb(keep['other_versions']):>12}",
              f"  {'registry':<52}{hb(keep['registry']):>12}",
              f"  {'whole store + base':<52}{hb(r['store_total_with_base_bytes']):>12}"
              + (f"  ({r['store_total_with_base_bytes'] / full:.2f}x the full copies)" if full else ""),
              "", f"{'entry':<14}{'mask':>12}{'density':>9}{'bits/param':>11}{'H(d)':>7}{'modality side':>15}"
              f"{'task vector':>13}{'full copy':>12}"]
    for e in r["entries"]:
        tv = "reference" if e.get("referenced") else f"{e['task_vector_bits_per_param']:.2f} b/p"
        lines.append(f"{e['name']:<14}{hb(e['mask_bytes']):>12}{e['mask_density']:>9.3f}"
                     f"{e['mask_bits_per_param']:>11.3f}{e['mask_entropy_bound']:>7.3f}"
                     f"{hb(e['modality_side_bytes']):>15}{tv:>13}{hb(e['full_copy_bytes']):>12}")
    lines += ["H(d) = -d log2 d - (1-d) log2(1-d): the fewest bits per parameter an independent random mask of",
              "density d can cost. Masks here are coded against the merged vector and the previous version, so",
              "they can cost less; bits/param counts every blob this version's masks need, shared parents included."]
    if r["entries"] and "fidelity" in r["entries"][0]:
        ranks = list(r["entries"][0]["fidelity"]["svd_lora_relative_error"])
        lines += ["", "relative error of the LLM task vector on linear layers (lower is better):",
                  f"{'entry':<14}{'MMER':>8}" + "".join(f"{'SVD r=' + k:>10}" for k in ranks)]
        for e in r["entries"]:
            f = e["fidelity"]
            lines.append(f"{e['name']:<14}{f['mmer_relative_error']:>8.3f}" +
                         "".join(f"{f['svd_lora_relative_error'][k]:>10.3f}" for k in ranks))
    return "\n".join(lines)


def plot_report(r: dict, path: str | Path) -> Path:
    """Size against reconstruction error: MMER and LoRA ranks, with the full copies as a reference line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the plot needs matplotlib: pip install matplotlib") from exc
    if not r["entries"] or "fidelity" not in r["entries"][0]:
        raise ValueError("the plot needs the fidelity comparison; run the report without --no-svd")
    mib = 1024**2
    fig, ax = plt.subplots(figsize=(6, 4))
    err = [e["fidelity"]["mmer_relative_error"] for e in r["entries"]]
    ax.scatter([r["mmer_total_bytes"] / mib], [sum(err) / len(err)], color="C0", zorder=3, label="MMER (mean over entries)")
    ranks = list(r["lora"])
    lora_err = [sum(e["fidelity"]["svd_lora_relative_error"][k] for e in r["entries"]) / len(r["entries"]) for k in ranks]
    ax.plot([r["lora"][k]["total_bytes"] / mib for k in ranks], lora_err, "o-", color="C1", label="LoRA (SVD of tau)")
    for k, x, y in zip(ranks, [r["lora"][k]["total_bytes"] / mib for k in ranks], lora_err):
        ax.annotate(f"r={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(r["full_copies_total_bytes"] / mib, color="grey", linestyle="--", label="full copies (error 0)")
    ax.set_xlabel("bytes to serve every entry (MiB, base included)")
    ax.set_ylabel("relative error of the task vector")
    ax.set_title(f"storage against fidelity, version {r['version']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
