"""Turning per-seed results into the Markdown table and the PNG chart."""

from __future__ import annotations

import statistics
from pathlib import Path

from mmer_cl.store.report_tables import human_bytes
from mmer_family.evaluate import METHODS, ORDER
from mmer_family.tasks import TASKS

LABELS = {"task_arithmetic": "task arithmetic", "average": "average (NaiveMC)", "ties": "ties",
          "mmer": "MMER (ties + masks)"}


def ms(values: list[float], pct: bool = True) -> str:
    """mean ± spread (sample std over seeds; just the value for one seed)."""
    k = 100 if pct else 1
    m = statistics.mean(values) * k
    if len(values) < 2:
        return f"{m:.1f}" if pct else f"{m:.2f}"
    s = statistics.stdev(values) * k
    return f"{m:.1f} ± {s:.1f}" if pct else f"{m:.2f} ± {s:.2f}"


def markdown(results: list[dict], meta: dict) -> str:
    seeds = [r["seed"] for r in results]
    lines = ["# MMER on a small real multimodal family", "",
             f"Seeds {seeds} (fine-tuning seeds; one base). Accuracy in %, mean ± std over seeds, "
             f"on the test split, scored once with the hyperparameters chosen on validation. {meta['note']}", ""]

    lines += ["## Task accuracy and retention", "",
              "| method | " + " | ".join(ORDER) + " | mean retention |", "|---|" + "---:|" * (len(ORDER) + 1)]
    lines.append("| chance | " + " | ".join(f"{100 * TASKS[n].chance:.1f}" for n in ORDER) + " | |")
    lines.append("| original fine-tunes | " + " | ".join(ms([r["original"][n]["test"] for r in results])
                                                      for n in ORDER) + " | 100 |")
    for m in METHODS:
        cells = [ms([r["test"][m][n] for r in results]) for n in ORDER]
        ret = [statistics.mean(r["test"][m][n] / max(r["original"][n]["test"], 1e-9) for n in ORDER) for r in results]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + f" | {ms(ret)} |")
    lines += ["", "Retention per task (MMER reconstruction / original):", "",
              "| task | retention % |", "|---|---:|"]
    for n in ORDER:
        lines.append(f"| {n} | {ms([r['test']['mmer'][n] / max(r['original'][n]['test'], 1e-9) for r in results])} |")
    lines += ["", "Chosen hyperparameters (per seed): " + "; ".join(
        f"seed {r['seed']}: " + ", ".join(f"{m} {_params(r['chosen'][m])}" for m in METHODS) for r in results)]
    lines += ["", "MMER mask density (fraction of the merged vector each modality takes): " + ", ".join(
        f"{n} {ms([r['mask_density'][n] for r in results])}%" for n in ORDER)]

    lines += ["", "## Text retention: held-out Shakespeare perplexity (lower is better)", "",
              "| LLM | perplexity |", "|---|---:|"]
    for key in results[0]["ppl"]:
        lines.append(f"| {key} | {ms([r['ppl'][key] for r in results], pct=False)} |")
    lines += ["", "Text-only inputs run on the base LLM (DESIGN.md), so MMER keeps the base's text skill exactly; "
              "the merged LLM rows show what a single merged model would cost."]

    lines += ["", "## Continual learning: entries registered one after another", "",
              f"Order: {' -> '.join(ORDER)}; after each registration an expansion (incremental for MMER). "
              "R[i][j] = test accuracy on task j after step i. BWT = mean final minus just-learned accuracy "
              "over earlier tasks (minus forgetting).", ""]
    for label, title in (("mmer", "MMER"), ("ties_merge", "ties merge, no masks")):
        lines += [f"{title}:", "", "| after registering | " + " | ".join(ORDER) + " |", "|---|" + "---:|" * len(ORDER)]
        for i, name in enumerate(ORDER):
            cells = [ms([r["continual"][label]["R"][i][j] for r in results]) if j <= i else "" for j in range(len(ORDER))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", f"BWT {title}: {ms([r['continual'][label]['bwt'] for r in results])} points", ""]
    lines += ["Sequential fine-tuning (audio digits, then speakers, one model) against MMER holding both entries:", "",
              "| | audio_digit | audio_speaker | BWT on audio_digit |", "|---|---:|---:|---:|"]
    seq_bwt = [r["sequential"]["audio_digit"] - r["original"]["audio_digit"]["test"] for r in results]
    lines.append(f"| sequential fine-tune | {ms([r['sequential']['audio_digit'] for r in results])} | "
                 f"{ms([r['sequential']['audio_speaker'] for r in results])} | {ms(seq_bwt)} |")
    mm_bwt = [r["continual"]["mmer"]["R"][2][1] - r["continual"]["mmer"]["R"][1][1] for r in results]
    lines.append(f"| MMER (both entries) | {ms([r['continual']['mmer']['R'][2][1] for r in results])} | "
                 f"{ms([r['continual']['mmer']['R'][2][2] for r in results])} | {ms(mm_bwt)} |")

    s = results[0]["storage"]
    lines += ["", f"## Storage (seed {results[0]['seed']}, MMER version {results[0]['mmer_version']})", "",
              "| what | bytes |", "|---|---:|",
              f"| base LLM (shared) | {human_bytes(s['base_bytes'])} |",
              f"| merged task vector | {human_bytes(s['merged_bytes'])} |"]
    for e in s["entries"]:
        lines.append(f"| mask {e['name']} (density {e['mask_density']:.2f}, {e['mask_bits_per_param']:.2f} bits/param, "
                     f"H = {e['mask_entropy_bound']:.2f}) | {human_bytes(e['mask_bytes'])} |")
    lines += [f"| **MMER total** (base + merged + masks + modality sides) | {human_bytes(s['mmer_total_bytes'])} |",
              f"| {len(s['entries'])} full fine-tuned copies | {human_bytes(s['full_copies_total_bytes'])} |"]
    for rank, l in s["lora"].items():
        lines.append(f"| LoRA rank {rank} on all linear layers (+ base, sides) | {human_bytes(l['total_bytes'])} |")
    lines += ["", "| entry | MMER rel. error of tau | " + " | ".join(
        f"SVD-LoRA r={k}" for k in s["entries"][0]["fidelity"]["svd_lora_relative_error"]) + " |",
        "|---|---:|" + "---:|" * len(s["lora"])]
    for e in s["entries"]:
        f = e["fidelity"]
        lines.append(f"| {e['name']} | {f['mmer_relative_error']:.3f} | " +
                     " | ".join(f"{v:.3f}" for v in f["svd_lora_relative_error"].values()) + " |")
    if "expansion" in results[0]:
        from mmer_family.expansion import markdown as expansion_markdown

        lines += expansion_markdown(results)
    lines += ["", f"Invariant: a single-entry store reconstructs its model exactly: "
              f"{all(r['single_entry_exact'] for r in results)}.", "", f"Reproduce: `{meta['command']}`", ""]
    return "\n".join(lines)


def _params(p: dict) -> str:
    if p["method"] == "task_arithmetic":
        return f"(alpha {p['alpha']})"
    if p["method"] == "average":
        return ""
    return f"(density {p['density']}, alpha {p['alpha']}, lambda {p['lam']})"


def chart(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("original", [[r["original"][n]["test"] for r in results] for n in ORDER])]
    rows += [(LABELS[m], [[r["test"][m][n] for r in results] for n in ORDER]) for m in METHODS]
    fig, ax = plt.subplots(figsize=(9, 4.6))
    width = 0.8 / len(rows)
    for i, (label, per_task) in enumerate(rows):
        means = [100 * statistics.mean(v) for v in per_task]
        errs = [100 * statistics.stdev(v) if len(v) > 1 else 0 for v in per_task]
        ax.bar([j + i * width for j in range(len(ORDER))], means, width, yerr=errs, label=label, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ORDER))], ORDER)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"MMER vs merging baselines, {len(results)} seed(s)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(rows), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
