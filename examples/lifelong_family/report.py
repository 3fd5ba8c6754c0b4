"""The lifelong table as markdown, and its plot."""

from __future__ import annotations

import statistics
from pathlib import Path

from lifelong_family.evaluate import LABELS, SYSTEMS
from lifelong_family.tasks import TASKS, majority
from mmer_family.report import human_bytes, ms


def _mean(values: list[float]) -> float:
    return statistics.mean(values)


def markdown(results: list[dict], meta: dict) -> str:
    order = results[0]["order"]
    n = len(order)
    seeds = ", ".join(str(r["seed"]) for r in results)
    lines = [f"# Lifelong family: {n} entries arriving one at a time", "",
             f"Seeds {seeds}; mean ± std over seeds, test split, every figure in %. "
             f"Merge parameters chosen once on validation (seed {meta['selection']['seed']}, all {n} entries; "
             "see below), then fixed for every arrival and seed. " + meta["note"], ""]

    lines += ["## Entries (in order of arrival)", "",
              "| t | entry | modality | classes | test size | chance (1/classes) | majority class | "
              "fine-tune test accuracy |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for t, name in enumerate(order, start=1):
        task = TASKS[name]
        size = results[0]["test_sizes"][name]
        lines.append(f"| {t} | {name} | {task.modality} | {len(task.labels)} | {size} | {100 * task.chance:.1f} | "
                     f"{100 * majority(name):.1f} | {ms([r['original'][name] for r in results])} |")

    lines += ["", "## Mean retention after each arrival (accuracy / the entry's own fine-tune)", "",
              "| system | " + " | ".join(f"t={t}" for t in range(1, n + 1)) + " |", "|---|" + "---:|" * n]
    for s in SYSTEMS:
        lines.append(f"| {LABELS[s]} | " + " | ".join(ms([r["mean_retention"][s][t] for r in results])
                                                    for t in range(n)) + " |")

    lines += ["", f"## After the last arrival (t = {n})", "",
              "| system | mean retention | worst entry's retention | BWT (points) | text perplexity | "
              "LLM bits / param / entry | all bytes to serve the N entries | one export |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in SYSTEMS:
        worst = ms([min(r["retention"][s][-1]) for r in results])
        export = results[0]["export_bytes"]["mmer" if s == "mmer" else "model"]
        lines.append(f"| {LABELS[s]} | {ms([r['mean_retention'][s][-1] for r in results])} | {worst} | "
                     f"{ms([r['bwt'][s][-1] for r in results])} | "
                     f"{ms([r['ppl'][s][-1] for r in results], pct=False)} | "
                     f"{_mean([r['bits_per_param'][s][-1] for r in results]):.2f} | "
                     f"{human_bytes(_mean([r['total_bytes'][s][-1] for r in results]))} | {human_bytes(export)} |")
    one = [r["oneshot"] for r in results]
    lines.append(f"| MMER, one version (same entries, a store expanded once) | (same masks and merge) | | | | "
                 f"{_mean([o['bits_per_param'][-1] for o in one]):.2f} | "
                 f"{human_bytes(_mean([o['total_bytes'][-1] for o in one]))} | |")
    lines += ["", f"Base LLM perplexity on held-out Shakespeare: {ms([r['base_ppl'] for r in results], pct=False)}. "
              "Text perplexity: the LLM that serves text-only inputs: the base for MMER (DESIGN.md) and for 1-bit "
              "deltas (which store it anyway); the merged LLM; the sequential chain's last LLM; for full copies, the "
              "mean over the entries' own LLMs (text sent to one of the copies).",
              "", "LLM bits / param / entry = 8 x (bytes of LLM weights on disk to serve all N entries) / "
              "(N x LLM parameters): MMER's from the store's report (base + merged task vector + masks, as stored, "
              "zstd-coded); 1-bit deltas: the float32 base + per entry the packed signs and one float32 scale per "
              "tensor; merges and the sequential model: one float32 LLM; full copies: N float32 LLMs. 'All bytes' "
              "adds every entry's encoder and projector (MMER: as the store keeps them, coded; the others: raw "
              "float32). One export: one entry written out as a standard checkpoint (MMER: `Store.export`; the "
              "others: `save_pretrained`, float32).", ""]

    rep = [r["mmer_report"][-1] for r in results]
    dep = rep[0]["deployment"]
    lines += [f"MMER's store at t = {n} (seed {results[0]['seed']}): deployment {human_bytes(dep['total'])} "
              f"(base {human_bytes(dep['base'])}, merged {human_bytes(dep['merged'])}, masks "
              f"{human_bytes(dep['masks'])}, encoders and projectors {human_bytes(dep['modality_sides'])}); the whole "
              "store's blobs on disk (with every entry's task vector kept for re-merging, and every earlier version; "
              f"the registry aside) {human_bytes(rep[0]['blob_total'])}; LoRA rank 8 on every linear layer (+ base, sides), from the "
              f"same report: {human_bytes(rep[0]['lora8_total_bytes'])}. Mask density per entry (mean over seeds): " +
              ", ".join(f"{e} {_mean([x['mask_density'][e] for x in rep]):.2f}" for e in order) + ".", ""]

    lines += ["## Bits per LLM parameter per entry after each arrival", "",
              "| system | " + " | ".join(f"t={t}" for t in range(1, n + 1)) + " |", "|---|" + "---:|" * n]
    for s in SYSTEMS:
        lines.append(f"| {LABELS[s]} | " + " | ".join(f"{_mean([r['bits_per_param'][s][t] for r in results]):.2f}"
                                                    for t in range(n)) + " |")
    one = [[r["oneshot"]["bits_per_param"][t] for r in results] for t in range(n)]
    lines.append("| MMER, one version | " + " | ".join(f"{_mean(v):.2f}" for v in one) + " |")
    lines += ["", "MMER's lifelong store codes each version against the one before (delta versions); serving version "
              "N from it needs that chain, which the store's report counts. 'One version' is the same merge and "
              "masks in a store that holds only that version."]

    lines += ["", "## BWT after each arrival (points; minus forgetting)", "",
              "| system | " + " | ".join(f"t={t}" for t in range(2, n + 1)) + " |", "|---|" + "---:|" * (n - 1)]
    for s in SYSTEMS:
        cells = [ms([r["bwt"][s][t] for r in results]) for t in range(1, n)]
        lines.append(f"| {LABELS[s]} | " + " | ".join(cells) + " |")

    lines += ["", "## Text perplexity after each arrival (held-out Shakespeare; lower is better)", "",
              "| system | " + " | ".join(f"t={t}" for t in range(1, n + 1)) + " |", "|---|" + "---:|" * n]
    for s in SYSTEMS:
        lines.append(f"| {LABELS[s]} | " + " | ".join(ms([r["ppl"][s][t] for r in results], pct=False)
                                                    for t in range(n)) + " |")

    lines += ["", "## Accuracy matrices", "", "R[t][j]: test accuracy of entry j after arrival t.", ""]
    for s in SYSTEMS:
        lines += [f"{LABELS[s]}:", "", "| after | " + " | ".join(order) + " |", "|---|" + "---:|" * n]
        for t in range(n):
            cells = [ms([r["R"][s][t][j] for r in results]) if j <= t else "" for j in range(n)]
            lines.append(f"| t={t + 1} (+{order[t]}) | " + " | ".join(cells) + " |")
        lines.append("")

    sel = meta["selection"]
    lines += ["## Merge parameters, chosen once on validation", "",
              f"Seed {sel['seed']}, all {n} entries registered, mean validation accuracy over the entries"
              + (f" (first {sel['val_limit']} validation examples of each)" if sel["val_limit"] else "") + ":", ""]
    for method, rows in sel["grid"].items():
        best = sel["chosen"][method]
        cells = ", ".join(f"{_point(r['params'])}{'*' if r['params'] == best else ''} {100 * r['val']:.1f}"
                          for r in rows)
        lines.append(f"- {LABELS[method]}: {cells}")
    lines += ["", f"Reproduce: `{meta['command']}` ({meta['seconds_total']:.0f} s here).", ""]
    return "\n".join(lines)


def _point(p: dict) -> str:
    if p["method"] == "task_arithmetic":
        return f"alpha {p['alpha']}"
    if p["method"] == "average":
        return "average"
    return f"d {p['density']} a {p['alpha']} l {p['lam']}"


def chart(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results[0]["order"])
    ts = list(range(1, n + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for s in SYSTEMS:
        means = [100 * _mean([r["mean_retention"][s][t] for r in results]) for t in range(n)]
        errs = [100 * statistics.stdev([r["mean_retention"][s][t] for r in results]) if len(results) > 1 else 0
                for t in range(n)]
        left.errorbar(ts, means, yerr=errs, marker="o", ms=3, capsize=2, label=LABELS[s])
        right.plot(ts, [_mean([r["bits_per_param"][s][t] for r in results]) for t in range(n)], marker="o", ms=3,
                   label=LABELS[s])
    right.plot(ts, [_mean([r["oneshot"]["bits_per_param"][t] for r in results]) for t in range(n)], "k--",
               label="MMER, one version")
    left.set_xlabel("entries arrived (N)")
    left.set_ylabel("mean retention (%)")
    left.set_title("retention vs. each entry's own fine-tune")
    right.set_xlabel("entries arrived (N)")
    right.set_ylabel("LLM bits / parameter / entry")
    right.set_yscale("log")
    right.set_title("bytes on disk to serve all N entries")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
