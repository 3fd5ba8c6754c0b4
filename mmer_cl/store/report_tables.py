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

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from mmer_cl.store.bitdelta_entries import ROLES as BITDELTA_ROLES
from mmer_cl.checkpoints.export import Progress
from mmer_cl.checkpoints.dtypes import ITEM_BYTES, is_float_code
from mmer_cl.runtime.table import human_bytes  # noqa: F401 (also re-exported for older imports)

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
                                            "non_weight_files", "reference": "references",
                                            **{role: "bitdelta_deltas" for role in BITDELTA_ROLES}}.get(
                                                r.role, "other_entry_blobs"))
        for v in reg.versions(b.id):
            for r in reg.version_blobs(v.id):
                kind = "masks" if r.role == "mask" else "merged" if r.role == "merged" else "legacy_accumulators"
                kinds.setdefault(r.digest, kind)
    for digest in reg.manifest_digests():  # what gc keeps: the immutable descriptions of rows
        kinds.setdefault(digest, "manifests")
    usage = {k: 0 for k in ("task_vectors", "references", "merged", "masks", "legacy_accumulators", "modality_sides",
                            "non_weight_files", "bitdelta_deltas", "other_entry_blobs", "manifests",
                            "unreferenced_blobs")}
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
            "codec": entry.codec, "lossy": False,
        }
        if svd:
            row["fidelity"] = _fidelity(store, version, base, m, entry.id, linear, ranks)
        entries.append(row)
        if progress:
            progress(step, len(version.members), m.entry_name)

    side = sum(e["modality_side_bytes"] for e in entries)
    masks = sum(e["mask_bytes"] for e in entries)
    one_bit = bitdelta_rows(store, base, n_params)
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
        "bitdelta_entries": one_bit,
        "bitdelta_total_bytes": sum(e["delta_bytes"] + e["modality_side_bytes"] for e in one_bit),
    }


def bitdelta_rows(store: "Store", base: "BaseRecord", n_params: int) -> list[dict]:
    """The active entries stored as 1-bit deltas (lossy; in no version, served from their own delta): what
    each costs, apart from the version's totals."""
    rows = []
    for entry in store.registry.entries(base.id):
        if entry.codec != "bitdelta":
            continue
        refs = store.registry.entry_blobs(entry.id)
        delta = sum(r.stored_bytes for r in refs if r.role in BITDELTA_ROLES)
        side = [r for r in refs if r.role in ("own", "aux")]
        rows.append({"name": entry.name, "modality": entry.modality, "task": entry.task, "codec": entry.codec,
                     "lossy": True, "delta_bytes": delta,
                     "delta_bits_per_param": 8 * delta / n_params if n_params else 0.0,
                     "modality_side_bytes": _blob_total(side)[0],
                     "full_copy_bytes": entry.stats.get("checkpoint_bytes", 0)})
    return rows


def _fidelity(store: "Store", version: "VersionRecord", base, member, entry_id: int, linear: dict,
              ranks: Sequence[int]) -> dict:
    """Relative errors over the linear layers: SVD-LoRA at each rank, and MMER's reconstruction."""
    reg = store.registry
    tv = store.blob_source(reg.entry_blobs(entry_id, "task_vector"))
    merged = store.blob_source(reg.version_blobs(version.id, "merged"))
    masks = store._mask_source(version, base, reg.entry_by_id(entry_id), member, store.reader, merged)
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
    """The report as text tables for the terminal (plain aligned lines, not rich: they are copied into
    READMEs and logs, where rich's box characters and terminal-width wrapping get in the way)."""
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
              ("bitdelta_deltas", "1-bit deltas (lossy entries)"),
              ("legacy_accumulators", "accumulators (stores from mmer-cl 0.1)"),
              ("other_entry_blobs", "other entry blobs"), ("manifests", "manifests (what audit checks rows against)"),
              ("unreferenced_blobs", "unreferenced (run `mmer gc`)"),
              ("registry", "registry database"), ("directories_and_other", "directories, lock, markers")]
    lines += [f"  {label:<44}{hb(disk[key]):>12}" for key, label in labels if disk.get(key)]
    full = r["full_copies_total_bytes"]
    lines += ["", f"Serving version {r['version']} (base counted once where it is shared):",
              f"  {'MMER: base + merged + masks + modality sides':<52}{hb(dep['total']):>12}",
              f"    {'base (referenced, not copied)':<50}{hb(dep['base']):>12}",
              f"    {'merged vector':<50}{hb(dep['merged']):>12}",
              f"    {'masks' if dep['masks'] else 'masks (computed on read from each task vector)':<50}"
              f"{hb(dep['masks']):>12}",
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
    lines += _bitdelta_lines(r)
    if r["entries"] and "fidelity" in r["entries"][0]:
        ranks = list(r["entries"][0]["fidelity"]["svd_lora_relative_error"])
        lines += ["", "relative error of the LLM task vector on linear layers (lower is better):",
                  f"{'entry':<14}{'MMER':>8}" + "".join(f"{'SVD r=' + k:>10}" for k in ranks)]
        for e in r["entries"]:
            f = e["fidelity"]
            lines.append(f"{e['name']:<14}{f['mmer_relative_error']:>8.3f}" +
                         "".join(f"{f['svd_lora_relative_error'][k]:>10.3f}" for k in ranks))
    return "\n".join(lines)


def _bitdelta_lines(r: dict) -> list[str]:
    """The entries stored as 1-bit deltas, marked lossy, apart from the version's totals."""
    rows = r.get("bitdelta_entries") or []
    if not rows:
        return []
    hb = human_bytes
    lines = ["", f"Entries stored as 1-bit deltas (codec bitdelta, LOSSY; never merged, served from their own delta "
             f"at every version; not in the totals above): {hb(r['bitdelta_total_bytes'])} with their sides",
             f"{'entry':<14}{'codec':>18}{'1-bit delta':>13}{'bits/param':>11}{'modality side':>15}{'full copy':>12}"]
    for e in rows:
        lines.append(f"{e['name']:<14}{'bitdelta (lossy)':>18}{hb(e['delta_bytes']):>13}"
                     f"{e['delta_bits_per_param']:>11.3f}{hb(e['modality_side_bytes']):>15}"
                     f"{hb(e['full_copy_bytes']):>12}")
    return lines


def load_retention(path: str | Path) -> dict:
    """Measured task retention (a method's task score over the fine-tuned model's, mean over entries) from
    ``path``: either ``{"retention": {"mmer": 0.97, "full": 1.0, "lora": {"16": 0.95}, "merges": {"ties": 0.85}}}``
    (every key but ``mmer`` optional) or the demo's ``examples/results/results.json`` (its per-task accuracies
    of the fine-tuned models, MMER and the plain merges, averaged over its seeds)."""
    from mmer_cl.errors import ConfigError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the evaluation {path}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("retention"), dict):
        ret = data["retention"]
    elif isinstance(data, dict) and isinstance(data.get("results"), list) and data["results"] \
            and all("original" in run and "test" in run for run in data["results"]):
        per_method: dict[str, list[float]] = {}
        for run in data["results"]:
            original = {task: scores["test"] for task, scores in run["original"].items()}
            for method, scores in run["test"].items():
                if isinstance(scores, dict) and set(scores) == set(original):
                    per_method.setdefault(method, []).append(
                        sum(scores[t] / original[t] for t in original if original[t]) / len(original))
        mean = {m: sum(v) / len(v) for m, v in per_method.items()}
        ret = {"mmer": mean.get("mmer"), "full": 1.0, "merges": {m: v for m, v in mean.items() if m != "mmer"}}
    else:
        example = '{"retention": {"mmer": 0.97, "full": 1.0, "lora": {"16": 0.95}}}'
        raise ConfigError(f"{path}: give {example} (a method's task score over the fine-tuned model's, mean over "
                          "the entries), or the demo's examples/results/results.json")
    if not isinstance(ret.get("mmer"), (int, float)):
        raise ConfigError(f"{path}: the retention of mmer is missing (\"mmer\": 0.97)")
    return {"mmer": float(ret["mmer"]), "full": float(ret.get("full", 1.0)),
            "lora": {str(k): float(v) for k, v in (ret.get("lora") or {}).items()},
            "merges": {str(k): float(v) for k, v in (ret.get("merges") or {}).items()}}


def plot_points(r: dict, retention: dict | None) -> tuple[list, str, str, tuple]:
    """What :func:`plot_report` draws: points ``(label, bytes, y, colour, marker)``, the y label, the title
    and the better corner ``(text, xy, ha, va)``."""
    points = []
    if retention is not None:
        points.append(("full copies", r["full_copies_total_bytes"], retention["full"], "grey", "s"))
        for rank, value in retention["lora"].items():
            if rank in r["lora"]:
                points.append((f"LoRA r={rank}", r["lora"][rank]["total_bytes"], value, "C1", "o"))
        one_llm = r["base_bytes"] + r["deployment"]["modality_sides"]
        for method, value in retention["merges"].items():
            points.append((f"{method} merge", one_llm, value, "C2", "^"))
        points.append(("MMER", r["mmer_total_bytes"], retention["mmer"], "C0", "*"))
        ylabel = "task retention\n(score / fine-tuned score, mean over entries)"
        title = f"Storage vs measured task retention, version {r['version']}"
        better = ("better: smaller, higher", (0.03, 0.95), "left", "top")
    else:
        def mean(values):
            return sum(values) / len(values)

        points.append(("full copies (exact)", r["full_copies_total_bytes"], 0.0, "grey", "s"))
        for rank in r["lora"]:
            err = mean([e["fidelity"]["svd_lora_relative_error"][rank] for e in r["entries"]])
            points.append((f"LoRA r={rank} (SVD)", r["lora"][rank]["total_bytes"], err, "C1", "o"))
        err = mean([e["fidelity"]["mmer_relative_error"] for e in r["entries"]])
        points.append(("MMER", r["mmer_total_bytes"], err, "C0", "*"))
        ylabel = "relative error of the LLM task vectors\n(mean over entries)"
        title = f"Storage vs reconstruction error, version {r['version']}"
        better = ("better: smaller, lower", (0.03, 0.05), "left", "bottom")
    return points, ylabel, title, better


def plot_report(r: dict, path: str | Path, retention: dict | None = None, source: str = "") -> Path:
    """Bytes to serve every entry against task retention (measured, from ``retention``) or, without it, the
    reconstruction error of the task vectors: full copies, LoRA ranks and MMER as points, the better corner
    marked, and a title that says which of the two the plot shows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the plot needs matplotlib: pip install matplotlib") from exc
    if retention is None and (not r["entries"] or "fidelity" not in r["entries"][0]):
        raise ValueError("the plot needs the error comparison (run the report without --no-svd) or a measured "
                         "retention (--eval FILE)")
    mib = 1024**2
    n = len(r["entries"])
    points, ylabel, title, better = plot_points(r, retention)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.set_ylabel(ylabel, fontsize=9)
    placed: dict[tuple, int] = {}
    for label, size, y, colour, marker in points:
        ax.scatter([size / mib], [y], color=colour, marker=marker, s=90 if marker == "*" else 45, zorder=3)
        spot = (round(size / mib, 3), round(y, 3))  # labels of points at one spot go one under the other
        placed[spot] = placed.get(spot, -1) + 1
        ax.annotate(label.replace("_", " "), (size / mib, y), textcoords="offset points",
                    xytext=(6, 4 - 10 * placed[spot]), fontsize=8)
    ax.set_xlabel(f"bytes to serve all {n} entries (MiB; base, encoders and projectors included)", fontsize=9)
    ax.set_title(title, fontsize=10)
    text, xy, ha, va = better
    ax.annotate(text, xy=xy, xycoords="axes fraction", ha=ha, va=va, fontsize=8, color="green",
                bbox={"boxstyle": "round", "fc": "white", "ec": "green"})
    notes = []
    if retention is None:
        notes += ["Reconstruction error is not task quality (MMER's masks keep what each task needs);",
                  "pass --eval with measured task scores for retention."]
    else:
        notes += [f"Retention measured in {Path(source).name if source else 'the evaluation given'}; full copies "
                  "define 1.0.", "LoRA ranks: shown only where their retention was measured."]
    fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, color="dimgrey", ha="left", va="bottom")
    ax.margins(x=0.3, y=0.15)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
