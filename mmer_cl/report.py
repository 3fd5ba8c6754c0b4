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
    merged_stored, merged_raw = _blob_total(b for b in blobs if b.role == "merged")
    acc_stored, _ = _blob_total(b for b in blobs if b.role.startswith("acc."))
    entries = []
    for step, m in enumerate(version.members, start=1):
        entry = reg.entry(base.id, m.entry_name)
        mask_stored, _ = _blob_total(b for b in blobs if b.role == "mask" and b.entry_id == m.entry_id)
        own = reg.entry_blobs(m.entry_id, "own") + reg.entry_blobs(m.entry_id, "aux")
        tv_stored, _ = _blob_total(reg.entry_blobs(m.entry_id, "task_vector"))
        row = {
            "name": m.entry_name, "modality": entry.modality, "task": entry.task,
            "mask_bytes": mask_stored, "mask_density": m.mask_density,
            "mask_bits_per_param": 8 * mask_stored / n_params if n_params else 0.0,
            "mask_entropy_bound": binary_entropy(m.mask_density), "scale": m.scale,
            "modality_side_bytes": _blob_total(own)[0], "modality_side_raw_bytes": _blob_total(own)[1],
            "task_vector_archive_bytes": tv_stored,
            "full_copy_bytes": entry.stats.get("checkpoint_bytes", 0),
        }
        if svd:
            row["fidelity"] = _fidelity(store, version, m, entry.id, linear, ranks)
        entries.append(row)
        if progress:
            progress(step, len(version.members), m.entry_name)

    side = sum(e["modality_side_bytes"] for e in entries)
    masks = sum(e["mask_bytes"] for e in entries)
    lora = {str(r): {"adapter_bytes_each": lora_params(list(linear.values()), r) * base_item,
                     "total_bytes": base_bytes + side + len(entries) * lora_params(list(linear.values()), r) * base_item}
            for r in ranks}
    return {
        "version": version.number, "params": version.params, "llm_params": n_params,
        "linear_layers": len(linear), "base_bytes": base_bytes,
        "merged_bytes": merged_stored, "merged_raw_bytes": merged_raw,
        "accumulator_bytes": acc_stored, "entries": entries,
        "mmer_total_bytes": base_bytes + merged_stored + masks + side,
        "full_copies_total_bytes": sum(e["full_copy_bytes"] for e in entries),
        "lora": lora,
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
    p = r["params"]
    lines = [
        f"version {r['version']}: {p['method']} (density {p['density']}, alpha {p['alpha']}), "
        f"masks {p['mask_rule']} (lambda {p['lam']}); {r['llm_params']:,} LLM parameters",
        "",
        f"{'artifact':<34}{'on disk':>14}",
        f"{'base LLM (shared, referenced)':<34}{human_bytes(r['base_bytes']):>14}",
        f"{'merged task vector':<34}{human_bytes(r['merged_bytes']):>14}",
        f"{'accumulators (for expansion)':<34}{human_bytes(r['accumulator_bytes']):>14}",
        "",
        f"{'entry':<14}{'mask':>12}{'density':>9}{'bits/param':>11}{'H(d)':>7}{'modality side':>15}"
        f"{'full copy':>12}",
    ]
    for e in r["entries"]:
        lines.append(f"{e['name']:<14}{human_bytes(e['mask_bytes']):>12}{e['mask_density']:>9.3f}"
                     f"{e['mask_bits_per_param']:>11.3f}{e['mask_entropy_bound']:>7.3f}"
                     f"{human_bytes(e['modality_side_bytes']):>15}{human_bytes(e['full_copy_bytes']):>12}")
    n = len(r["entries"])
    lines += ["", f"total for {n} entries (base included where it is needed):",
              f"  {'MMER (base + merged + masks + modality sides)':<48}{human_bytes(r['mmer_total_bytes']):>12}",
              f"  {'full fine-tuned copies':<48}{human_bytes(r['full_copies_total_bytes']):>12}"]
    for rank, l in r["lora"].items():
        label = f"LoRA rank {rank}, {r['linear_layers']} linear layers (+ base, sides)"
        lines.append(f"  {label:<48}"
                     f"{human_bytes(l['total_bytes']):>12}")
    if r["entries"] and "fidelity" in r["entries"][0]:
        ranks = list(r["entries"][0]["fidelity"]["svd_lora_relative_error"])
        lines += ["", "relative error of the LLM task vector on linear layers (lower is better):",
                  f"{'entry':<14}{'MMER':>8}" + "".join(f"{'SVD r=' + k:>10}" for k in ranks)]
        for e in r["entries"]:
            f = e["fidelity"]
            lines.append(f"{e['name']:<14}{f['mmer_relative_error']:>8.3f}" +
                         "".join(f"{f['svd_lora_relative_error'][k]:>10.3f}" for k in ranks))
    return "\n".join(lines)
