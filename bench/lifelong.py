"""What each arrival costs over a long sequence: time, peak memory, bytes and export, against k.

    python bench/lifelong.py                      # ~66M-parameter Llama (bf16), 24 fine-tunes
    python bench/lifelong.py --hidden 1280 --intermediate 3584 --layers 12 --vocab 40000 --n 8   # ~350M
    python bench/lifelong.py --kv-heads 2 --shards 3 --hidden 512 --layers 6 --vocab 12000 --n 12 --plot
    python bench/lifelong.py --smoke              # a tiny model, 5 arrivals: seconds (a fast test runs it)

It builds one bf16 Llama-shaped base and ``n`` structured fine-tunes, one
at a time, just before each arrives. Each fine-tune's change to a weight
matrix is a shared low-rank part (the same directions for every fine-tune,
with its own weight), a task-specific low-rank part and a sparse
heavy-tailed part, scaled to ``--scale`` (default 2%) of the tensor's std,
with row scales drawn log-normal, so that a realistic share of the bf16
weights (printed) stays bit-identical to the base. Norm vectors change at a
few positions.

Every arrival is ``mmer register`` then ``mmer expand`` (version k holds k
entries), each in a process of its own (wall time and peak RSS from
``wait4``), then the first entry is exported from the newest version and
from v1, each in a process of its own and timed inside it. Per arrival it
prints: seconds and peak RSS of register and expand, the version's bytes
(``du -sb`` after the expand minus before it) against one copy of the
checkpoint, the store (``du -sb``) against k copies, and both exports'
seconds. Bytes are exact whatever the machine's load; times are not, so the
load average is printed beside them. ``--plot`` draws the four curves
against k; the JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from store_bench import du_sb, load_average, run_measured  # noqa: E402

MMER = [sys.executable, "-m", "mmer_cl.cli"]


# ---- the models ----------------------------------------------------------------------------------
def shapes_of(hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int
              ) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _seed(*parts) -> int:
    import zlib

    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def base_tensor(name: str, shape: tuple[int, ...]):
    import torch

    g = torch.Generator().manual_seed(_seed("base", name))
    if len(shape) == 1:
        return (1.0 + 0.05 * torch.randn(shape, generator=g)).bfloat16()
    return (0.02 * torch.randn(shape, generator=g)).bfloat16()


def _unit(t):
    return t / t.std().clamp(min=1e-12)


def change(name: str, base, which: int, scale: float, shared_rank: int = 8, task_rank: int = 4,
           sparse: float = 0.005):
    """Fine-tune ``which``'s change to one base tensor (float32), ``scale`` of the base tensor's std."""
    import torch

    std = base.float().std()
    g = torch.Generator().manual_seed(_seed("ft", which, name))
    if base.dim() == 1:  # a norm: a few positions move
        out = torch.zeros(base.shape)
        at = torch.rand(base.shape, generator=g) < 0.1
        out[at] = scale * 0.05 * torch.randn(int(at.sum()), generator=g)
        return out
    rows, cols = base.shape
    gs = torch.Generator().manual_seed(_seed("shared", name))  # the same directions for every fine-tune
    shared = torch.randn(rows, shared_rank, generator=gs) @ torch.randn(shared_rank, cols, generator=gs)
    weight = 0.5 + torch.rand(1, generator=g).item()
    task = torch.randn(rows, task_rank, generator=g) @ torch.randn(task_rank, cols, generator=g)
    low_rank = _unit(weight * _unit(shared) + _unit(task))
    # log-normal row scales, mostly shared by the fine-tunes: many rows barely move, in all of them
    row_scale = torch.exp(1.5 * (0.8 * torch.randn(rows, 1, generator=gs) + 0.6 * torch.randn(rows, 1, generator=g)))
    heavy = torch.zeros(rows, cols)
    at = torch.rand(rows, cols, generator=g) < sparse
    # heavy tails; a uniform draw of exactly 0 (its smallest step is 2**-24) would give inf
    heavy[at] = torch.randn(int(at.sum()), generator=g) / torch.rand(int(at.sum()), generator=g).clamp(
        min=2.0 ** -24).sqrt()
    return scale * std * _unit(low_rank * row_scale + 0.3 * _unit(heavy) * row_scale.mean())


def save_checkpoint(directory: Path, tensors: dict, config: dict, shards: int) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = math.ceil(len(names) / shards)
        weight_map, total = {}, 0
        for s in range(shards):
            part = names[s * per:(s + 1) * per]
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(directory / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
            total += sum(tensors[n].numel() * tensors[n].element_size() for n in part)
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps(config, indent=1))


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}


def build_base(directory: Path, shapes: dict, config: dict, shards: int) -> None:
    save_checkpoint(directory, {n: base_tensor(n, s) for n, s in shapes.items()}, config, shards)


def build_finetune(directory: Path, shapes: dict, config: dict, shards: int, which: int, scale: float
                   ) -> float:
    """Write fine-tune ``which``; returns the share of its weights bit-identical to the base."""
    tensors, same, total = {}, 0, 0
    for n, s in shapes.items():
        b = base_tensor(n, s)
        t = (b.float() + change(n, b, which, scale)).bfloat16()
        same += int((t.view(dtype=b.dtype) == b).sum())  # bf16 compare: equal values, same bits here
        total += t.numel()
        tensors[n] = t
    save_checkpoint(directory, tensors, config, shards)
    return same / total


# ---- one arrival ---------------------------------------------------------------------------------
def export_timed(store: Path, out: Path, version: str) -> dict:
    """Export e1 from ``version`` in a process of its own; seconds inside the call, and the process's peak RSS."""
    code = ("import sys, time; from mmer_cl.store import Store; s = Store(sys.argv[1]); t = time.perf_counter(); "
            "s.export('e1', sys.argv[2], version=sys.argv[3]); print('SECONDS', time.perf_counter() - t)")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(store), str(out), version], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export failed:\n{text[-3000:]}")
    seconds = float([line for line in text.splitlines() if line.startswith("SECONDS")][-1].split()[1])
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "process_seconds": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024}


def run(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="mmer-lifelong-"))
    work.mkdir(parents=True, exist_ok=True)
    heads = args.heads or max(1, args.hidden // 64)
    kv_heads = args.kv_heads or heads
    shapes = shapes_of(args.hidden, args.intermediate, args.layers, args.vocab, heads, kv_heads)
    config = llama_config(args.hidden, args.intermediate, args.layers, args.vocab, heads, kv_heads)
    params = sum(math.prod(s) for s in shapes.values())
    copy = 2 * params  # one bf16 checkpoint's weights
    base = work / "base"
    built_in_child(base, shapes, config, args.shards)
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    mmer = MMER + ["--store", str(store), "-q"]
    subprocess.run(mmer + ["init", "--base", str(base)], check=True, capture_output=True)
    rows = []
    print(f"{params / 1e6:.1f}M parameters, one copy {copy / 1e6:.1f} MB; {args.n} fine-tunes; work {work}")
    print(f"{'k':>3} {'same':>5} {'register':>9} {'expand':>8} {'peak RSS':>9} {'version/copy':>12} "
          f"{'store/copies':>12} {'export new':>10} {'export v1':>9}  load")
    for k in range(1, args.n + 1):
        ft = work / f"ft{k}"
        same = built_in_child(ft, shapes, config, args.shards, k, args.scale)
        reg = run_measured(mmer + ["register", str(ft), "--name", f"e{k}", "--modality", f"m{k}"])
        if not args.keep_models:
            shutil.rmtree(ft)
        before = du_sb(store)
        exp = run_measured(mmer + ["expand", "--density", str(args.density)])
        after = du_sb(store)
        row = {"k": k, "bit_identical": same, "register": reg, "expand": exp, "version_bytes": after - before,
               "store_bytes": after, "copy_bytes": copy, "version_over_copy": (after - before) / copy,
               "store_over_copies": after / (k * copy), "load": load_average()}
        if not args.no_export:
            row["export_newest"] = export_timed(store, work / "out", "current")
            row["export_v1"] = export_timed(store, work / "out", "1")
        rows.append(row)
        print(f"{k:>3} {same:>5.2f} {reg['seconds']:>8.1f}s {exp['seconds']:>7.1f}s "
              f"{max(reg['peak_rss'], exp['peak_rss']) / 1e9:>8.2f}G {row['version_over_copy']:>12.3f} "
              f"{row['store_over_copies']:>12.3f} "
              + (f"{row['export_newest']['seconds']:>9.2f}s {row['export_v1']['seconds']:>8.2f}s"
                 if not args.no_export else f"{'-':>10} {'-':>9}") + f"  {row['load']}", flush=True)
    later = [r["version_over_copy"] for r in rows[1:]]
    summary = {"max_version_over_copy": max(r["version_over_copy"] for r in rows),
               "mean_version_over_copy_v2_on": sum(later) / len(later) if later else None,
               "store_over_copies": rows[-1]["store_over_copies"], "du_sb": du_sb(store)}
    print(f"largest version {summary['max_version_over_copy']:.3f} of a copy; mean of v2..v{args.n} "
          f"{summary['mean_version_over_copy_v2_on'] or 0:.3f}; store {summary['store_over_copies']:.3f} "
          f"of {args.n} copies")
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "parameters": params, "rows": rows, "summary": summary}
    if not args.work and not args.keep_models:
        shutil.rmtree(work, ignore_errors=True)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax[0][0].plot(ks, [r["register"]["seconds"] + r["expand"]["seconds"] for r in rows], "o-", label="register + expand")
    ax[0][0].plot(ks, [r["expand"]["seconds"] for r in rows], "o-", label="expand")
    ax[0][0].set_title("seconds per arrival")
    ax[0][1].plot(ks, [max(r["register"]["peak_rss"], r["expand"]["peak_rss"]) / 1e9 for r in rows], "o-")
    ax[0][1].set_title("peak RSS (GB)")
    ax[1][0].plot(ks, [r["version_over_copy"] for r in rows], "o-", label="version / one copy")
    ax[1][0].plot(ks, [r["store_over_copies"] for r in rows], "o-", label="store / k copies")
    ax[1][0].axhline(0.35, color="grey", lw=0.5)
    ax[1][0].set_title("bytes")
    if "export_newest" in rows[0]:
        ax[1][1].plot(ks, [r["export_newest"]["seconds"] for r in rows], "o-", label="from the newest")
        ax[1][1].plot(ks, [r["export_v1"]["seconds"] for r in rows], "o-", label="from v1")
    ax[1][1].set_title("export of the first entry (s)" if "export_newest" in rows[0] else "export: skipped (--no-export)")
    for a in ax.flat:
        a.set_xlabel("k (entries)")
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.suptitle(f"{result['parameters'] / 1e6:.0f}M parameters, {len(rows)} arrivals")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def built_in_child(directory: Path, shapes: dict, config: dict, shards: int, which: int | None = None,
                   scale: float = 0.0) -> float:
    """Build the base (``which`` None) or fine-tune ``which`` in a process of its own, so that this process
    stays small: a child's peak RSS as ``wait4`` reports it is at least its parent's RSS at fork time."""
    spec = json.dumps({"directory": str(directory), "shapes": {k: list(v) for k, v in shapes.items()},
                       "config": config, "shards": shards, "which": which, "scale": scale})
    done = subprocess.run([sys.executable, __file__, "_build", spec], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def _build_here(spec: str) -> None:
    d = json.loads(spec)
    shapes = {k: tuple(v) for k, v in d["shapes"].items()}
    if d["which"] is None:
        build_base(Path(d["directory"]), shapes, d["config"], d["shards"])
        print(1.0)
    else:
        print(build_finetune(Path(d["directory"]), shapes, d["config"], d["shards"], d["which"], d["scale"]))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_build":
        _build_here(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--intermediate", type=int, default=1792)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=20000)
    ap.add_argument("--heads", type=int, default=0, help="attention heads [hidden / 64]")
    ap.add_argument("--kv-heads", type=int, default=0, help="key/value heads (GQA) [heads]")
    ap.add_argument("--shards", type=int, default=1, help="safetensors files per checkpoint")
    ap.add_argument("--n", type=int, default=24, help="fine-tunes, arriving one at a time")
    ap.add_argument("--scale", type=float, default=0.02, help="size of a change, against the tensor's std")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--no-export", action="store_true", help="skip the export timings")
    ap.add_argument("--keep-models", action="store_true", help="keep the fine-tunes (and the work dir)")
    ap.add_argument("--work", type=Path, help="where models and the store go [a temp dir, removed]")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lifelong.json")
    ap.add_argument("--plot", action="store_true", help="also write the curves next to --out (.png)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, 5 arrivals")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.intermediate, args.layers, args.vocab, args.n = 64, 160, 2, 512, 5
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
