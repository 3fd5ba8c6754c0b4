"""The store against what it replaces, at model scale: bytes on disk, time and peak memory.

    python bench/store_bench.py                  # ~270M-parameter Llama (bf16), 6 fine-tunes, 3 repeats
    python bench/store_bench.py --hidden 768 --intermediate 2048 --layers 12 --vocab 24000 --k 5
    python bench/store_bench.py --smoke          # a tiny model, one repeat, no mergekit: seconds (CI runs it)

It builds, locally, a Llama-shaped bf16 base of the given size and ``k``
dense fine-tunes (base + Gaussian noise, one seed each), then runs every
step in a process of its own and records wall time and peak RSS (from
``wait4``), interleaving the tools in each repeat:

* mergekit ``mergekit-yaml`` ties of the first 3 fine-tunes (density 0.2),
  installed by this script in its own venv (``bench/.venv-mergekit``);
* mmer ``merge_checkpoints`` of the same 3 (no store);
* mmer ``init``, ``register`` x 3, ``expand``, ``export``, then the
  incremental curve: ``register`` + ``expand`` one at a time up to ``k``;
* the baseline for ``register``: reading one fine-tune and compressing each
  tensor once with the store's codec.

It prints the machine's limits (page-cache read, fdatasync write, zstd and
sha256 throughput), a table with min and median of every step, the ratios
mmer / mergekit, and the store's bytes on disk (``du -sb``) after each step
against the same number of full copies; the JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_VENV = ROOT / "bench" / ".venv-mergekit"
MERGEKIT_VERSION = "0.1.5"
TORCH = "torch==2.13.0"


# ---- measuring -----------------------------------------------------------------------------------
def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` in its own process; wall seconds and peak RSS (bytes) of that process tree's leader."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step failed: {' '.join(map(str, cmd))}\n{out.decode(errors='replace')[-3000:]}")
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024}


def du_sb(path: Path) -> int:
    """What ``du -sb`` prints: apparent sizes of every file and directory below ``path``."""
    total = path.lstat().st_size
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- the models ----------------------------------------------------------------------------------
def build_family(work: Path, hidden: int, intermediate: int, layers: int, vocab: int, k: int,
                 noise: float) -> tuple[Path, list[Path]]:
    """A random bf16 Llama base and ``k`` fine-tunes (base + N(0, noise) per weight), one tensor at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False,
                      torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    gen = torch.Generator().manual_seed(0)
    base = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02).bfloat16()
            for n, s in shapes.items()}
    paths = []
    for i in range(k + 1):
        d = work / ("base" if i == 0 else f"ft{i}")
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(1000 + i)
        tensors = base if i == 0 else {n: (t.float() + torch.randn(t.shape, generator=g) * noise).bfloat16()
                                       for n, t in base.items()}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(d)
        paths.append(d)
        del tensors
    return paths[0], paths[1:]


def parameter_count(base: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        return sum(_prod(f.get_slice(n).get_shape()) for n in f.keys())


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- the machine's limits ----------------------------------------------------------------------------
def machine_limits(sample: Path, work: Path) -> dict:
    import numpy as np
    import zstandard

    data = sample.read_bytes()  # warm the page cache
    start = time.perf_counter()
    with open(sample, "rb") as fh:
        while fh.read(64 << 20):
            pass
    read = len(data) / (time.perf_counter() - start)
    block = np.random.default_rng(0).integers(0, 255, size=256 << 20, dtype=np.uint8).tobytes()
    target = work / "fdatasync.bin"
    start = time.perf_counter()
    with open(target, "wb") as fh:
        fh.write(block)
        fh.flush()
        os.fdatasync(fh.fileno())
    write = len(block) / (time.perf_counter() - start)
    target.unlink()
    chunk = data[: 128 << 20]
    start = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=3).compress(chunk)
    comp = len(chunk) / (time.perf_counter() - start)
    start = time.perf_counter()
    zstandard.ZstdDecompressor().decompress(packed)
    decomp = len(chunk) / (time.perf_counter() - start)
    start = time.perf_counter()
    hashlib.sha256(chunk).hexdigest()
    sha = len(chunk) / (time.perf_counter() - start)
    return {"page_cache_read": read, "fdatasync_write": write, "zstd3_compress_1thread": comp,
            "zstd3_decompress_1thread": decomp, "sha256": sha}


# ---- the steps (each run in its own process) ----------------------------------------------------------
MMER = [sys.executable, "-m", "mmer_cl.cli"]


def mergekit_config(base: Path, fts: list[Path], density: float) -> str:
    models = "\n".join(f"  - model: {p}\n    parameters:\n      density: {density}\n      weight: 1.0" for p in fts)
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}\n"
            "parameters:\n  normalize: true\n  int8_mask: false\ndtype: bfloat16\n")


def ensure_mergekit() -> Path:
    """mergekit (and, for the codec comparison, ZipNN and zstandard) in a venv of their own."""
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    python = MERGEKIT_VENV / "bin" / "python"
    if exe.exists():
        if subprocess.run([str(python), "-c", "import zipnn, zstandard"], capture_output=True).returncode:
            subprocess.run([str(python), "-m", "pip", "install", "-q", "zipnn", "zstandard"], check=True)
        return exe
    print(f"installing mergekit {MERGEKIT_VERSION} into {MERGEKIT_VENV} (once)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(TORCH + "\n")
    subprocess.run(pip + ["-c", fh.name, f"mergekit=={MERGEKIT_VERSION}", "zipnn", "zstandard"], check=True)
    return exe


def one_repeat(base: Path, fts: list[Path], work: Path, density: float, mergekit: Path | None) -> dict:
    """One interleaved pass of every step; returns {step: measurement} and the store sizes."""
    rep: dict = {}
    work.mkdir(parents=True, exist_ok=True)
    first3 = fts[:3]
    if mergekit is not None:
        cfg = work / "ties.yml"
        cfg.write_text(mergekit_config(base, first3, density))
        out = work / "mergekit-out"
        shutil.rmtree(out, ignore_errors=True)
        rep["mergekit ties (3)"] = run_measured([str(mergekit), str(cfg), str(out)])
        shutil.rmtree(out, ignore_errors=True)
    out = work / "mc-out"
    shutil.rmtree(out, ignore_errors=True)
    code = ("import sys; from mmer_cl import MergeParams, merge_checkpoints; "
            f"merge_checkpoints({str(base)!r}, {[str(p) for p in first3]!r}, {str(out)!r}, "
            f"params=MergeParams(density={density}))")
    rep["mmer merge_checkpoints (3)"] = run_measured([sys.executable, "-c", code])
    shutil.rmtree(out, ignore_errors=True)

    code = ("import sys; from storage.codecs import encode; from mmer_cl.checkpoints.checkpoint import Checkpoint; "
            "c = Checkpoint(sys.argv[1]); [encode(c.get(n)) for n in c.names()]")
    rep["read + compress one checkpoint"] = run_measured([sys.executable, "-c", code, str(fts[0])])

    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    mmer = MMER + ["--store", str(store), "-q"]
    sizes = []
    rep["mmer init"] = run_measured(mmer + ["init", "--base", str(base)])
    for i, p in enumerate(first3, start=1):
        rep[f"mmer register #{i}"] = run_measured(mmer + ["register", str(p), "--name", f"e{i}", "--modality",
                                                          f"m{i}"])
        sizes.append((f"register e{i}", du_sb(store), i))
    rep["mmer expand (3)"] = run_measured(mmer + ["expand", "--density", str(density)])
    sizes.append(("expand v1 (3 entries)", du_sb(store), 3))
    phases = [("expand (3)", phase_seconds(mmer))]
    out = work / "export-out"
    shutil.rmtree(out, ignore_errors=True)
    rep["mmer export"] = run_measured(mmer + ["export", "--entry", "e1", str(out)])
    shutil.rmtree(out, ignore_errors=True)
    rep["Store.export call (in-process)"] = export_call(store, out)
    shutil.rmtree(out, ignore_errors=True)
    for i, p in enumerate(fts[3:], start=4):
        rep[f"mmer register #{i}"] = run_measured(mmer + ["register", str(p), "--name", f"e{i}", "--modality",
                                                          f"m{i}"])
        sizes.append((f"register e{i}", du_sb(store), i))
        rep[f"mmer expand ({i}, incremental)"] = run_measured(mmer + ["expand"])
        sizes.append((f"expand v{i - 2} ({i} entries)", du_sb(store), i))
        phases.append((f"expand ({i}, incremental)", phase_seconds(mmer)))
    report = subprocess.run(mmer + ["report", "--no-svd", "--json"], capture_output=True, text=True, check=True)
    rep["_sizes"] = sizes + reference_sequence(base, fts, work, density)
    rep["_report"] = json.loads(report.stdout)
    rep["_du"] = du_sb(store)
    rep["_phases"] = phases
    return rep


def phase_seconds(mmer: list[str]) -> dict:
    """Where the current version's expansion spent its time, as it recorded (``mmer show --json``)."""
    shown = subprocess.run(mmer + ["show", "--json"], capture_output=True, text=True, check=True)
    return json.loads(shown.stdout)["details"].get("phase_seconds", {})


def export_call(store: Path, out: Path) -> dict:
    """The export itself, timed inside its process (no interpreter start, imports or store opening)."""
    code = ("import sys, time; from mmer_cl.store import Store; s = Store(sys.argv[1]); t = time.perf_counter(); "
            "s.export('e1', sys.argv[2]); print(time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code, str(store), str(out)], capture_output=True, text=True,
                          check=True)
    written = sum(p.stat().st_size for p in out.iterdir())
    return {"seconds": float(proc.stdout.strip().splitlines()[-1]), "peak_rss": 0, "bytes": written}


def warm_up(work: Path) -> None:
    """Run the whole sequence once on a tiny model, so that the compiled loops are built (and cached on disk)
    before anything is timed."""
    tiny = work / "warm-up"
    subprocess.run([sys.executable, __file__, "_build", str(tiny / "models"), "64", "128", "2", "256", "4", "0.0005"],
                   check=True)
    one_repeat(tiny / "models" / "base", [tiny / "models" / f"ft{i}" for i in range(1, 5)], tiny / "run", 0.2,
               None)
    shutil.rmtree(tiny, ignore_errors=True)


def reference_sequence(base: Path, fts: list[Path], work: Path, density: float) -> list[tuple[str, int, int]]:
    """The same sequence with every entry registered by reference: the store's size after each step."""
    store = work / "store-ref"
    shutil.rmtree(store, ignore_errors=True)
    mmer = MMER + ["--store", str(store), "-q"]
    subprocess.run(mmer + ["init", "--base", str(base)], check=True, capture_output=True)
    sizes = []
    for i, p in enumerate(fts, start=1):
        subprocess.run(mmer + ["register", str(p), "--name", f"e{i}", "--modality", f"m{i}", "--reference"],
                       check=True, capture_output=True)
        if i >= 3:
            subprocess.run(mmer + ["expand", "--density", str(density)], check=True, capture_output=True)
            sizes.append((f"--reference: {i} entries, v{i - 2}", du_sb(store), i))
    return sizes


def codec_comparison(base: Path, ft: Path, mergekit: Path | None) -> dict | None:
    """bench/task_vector_codecs.py in the bench venv (it has ZipNN), else here without ZipNN."""
    python = mergekit.parent / "python" if mergekit else Path(sys.executable)
    out = subprocess.run([str(python), str(ROOT / "bench" / "task_vector_codecs.py"), str(base), str(ft)],
                         capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def summarise(reps: list[dict], full_copy: int) -> dict:
    steps = [k for k in reps[0] if not k.startswith("_")]
    table = {}
    for step in steps:
        secs = [r[step]["seconds"] for r in reps]
        rss = [r[step]["peak_rss"] for r in reps]
        table[step] = {"min_s": min(secs), "median_s": statistics.median(secs), "peak_rss_max": max(rss),
                       "peak_rss_median": statistics.median(rss)}
    phases = {label: {p: statistics.median(r["_phases"][i][1][p] for r in reps) for p in reps[0]["_phases"][i][1]}
              for i, (label, _) in enumerate(reps[0]["_phases"])}
    return {"steps": table, "sizes": reps[-1]["_sizes"], "full_copy_bytes": full_copy, "phases": phases}


def print_summary(summary: dict, limits: dict, params: int, args) -> None:
    gb = 1e9
    print(f"\nmodel: {params / 1e6:.0f}M parameters, bf16; {args.k} fine-tunes (noise std {args.noise}); "
          f"density {args.density}; {args.repeats} repeat(s); load average at end {load_average()}")
    print("machine: " + ", ".join(f"{k} {v / gb:.2f} GB/s" for k, v in limits.items()))
    print("\n| step | min s | median s | peak RSS (GB, median) |\n|---|---:|---:|---:|")
    for step, m in summary["steps"].items():
        print(f"| {step} | {m['min_s']:.1f} | {m['median_s']:.1f} | {m['peak_rss_median'] / gb:.2f} |")
    steps = summary["steps"]
    if "mergekit ties (3)" in steps:
        mk = steps["mergekit ties (3)"]
        print("\n| ratio (same run) | time (median) | peak RSS (median) |\n|---|---:|---:|")
        for step in ("mmer expand (3)", "mmer merge_checkpoints (3)"):
            m = steps[step]
            print(f"| {step} / mergekit ties (3) | {m['median_s'] / mk['median_s']:.2f} | "
                  f"{m['peak_rss_median'] / mk['peak_rss_median']:.2f} |")
    call = steps.get("Store.export call (in-process)")
    if call and "fdatasync_write" in limits:
        rate = summary["full_copy_bytes"] / call["median_s"]
        print(f"\nexport throughput: {rate / gb:.2f} GB/s inside the call (median), "
              f"{summary['full_copy_bytes'] / steps['mmer export']['median_s'] / gb:.2f} GB/s for the whole command; "
              f"fdatasync write {limits['fdatasync_write'] / gb:.2f} GB/s (target: at least half)")
    if summary.get("phases"):
        print("\n| expand (seconds, median; reading runs on a second thread) | read | merge and masks | coding |"
              "\n|---|---:|---:|---:|")
        for label, p in summary["phases"].items():
            print(f"| {label} | {p.get('read', 0):.1f} | {p.get('merge_and_masks', 0):.1f} | {p.get('code', 0):.1f} |")
    base = steps.get("read + compress one checkpoint")
    if base:
        regs = [m["median_s"] for s, m in steps.items() if s.startswith("mmer register")]
        print(f"\nregister / (read + compress once): {statistics.median(regs) / base['median_s']:.2f}")
    full = summary["full_copy_bytes"]
    print("\n| after | store (du -sb) | full copies | ratio |\n|---|---:|---:|---:|")
    for label, size, n in summary["sizes"]:
        print(f"| {label} | {size / gb:.3f} GB | {n * full / gb:.3f} GB | {size / (n * full):.2f} |")
    steps = summary["sizes"]
    print("\n| version | bytes it added (masks included) | of one full copy |\n|---|---:|---:|")
    for (label, size, _), (_, before, _) in zip(steps[1:], steps[:-1]):
        if label.startswith("expand"):
            print(f"| {label} | {(size - before) / gb:.3f} GB | {(size - before) / full:.2f} |")
    if summary.get("codecs"):
        print("\n| one fine-tune, stored as | bits/param | seconds |\n|---|---:|---:|")
        for k, v in summary["codecs"].items():
            print(f"| {k} | {v['bits_per_param']:.2f} | {v['seconds']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=6, help="fine-tunes (at least 3)")
    ap.add_argument("--noise", type=float, default=0.0005,
                    help="std of the fine-tunes' change (0.0005 on weights of std 0.02 gives task vectors of about "
                         "8 bits/param, like the 271M model the store was first measured on)")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, help="where models and stores go [a temp dir]")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 repeat, no mergekit")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "store_bench.json")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.intermediate, args.layers, args.vocab, args.k, args.repeats = 64, 128, 2, 256, 4, 1
        args.no_mergekit = True
    if args.k < 3:
        raise SystemExit("--k must be at least 3")
    work = args.work or Path(tempfile.mkdtemp(prefix="mmer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    mergekit = None if args.no_mergekit else ensure_mergekit()
    print(f"building the models in {work} ...", flush=True)
    # Heavy work runs in children: this process stays small, so that no child inherits a large
    # peak RSS from it at fork time (wait4 would report that instead of the child's own).
    spec = [args.hidden, args.intermediate, args.layers, args.vocab, args.k, args.noise]
    subprocess.run([sys.executable, __file__, "_build", str(work / "models"), *map(str, spec)], check=True)
    base, fts = work / "models" / "base", [work / "models" / f"ft{i}" for i in range(1, args.k + 1)]
    found = subprocess.run([sys.executable, __file__, "_limits", str(fts[0] / "model.safetensors"), str(work)],
                           check=True, capture_output=True, text=True).stdout
    limits, params = json.loads(found)
    full_copy = (fts[0] / "model.safetensors").stat().st_size
    warm_up(work)
    reps = []
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats} (load average {load_average()})", flush=True)
        reps.append(one_repeat(base, fts, work / "run", args.density, mergekit))
    summary = summarise(reps, full_copy)
    summary["codecs"] = codec_comparison(base, fts[0], mergekit)
    print_summary(summary, limits, params, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "params": params,
                                    "limits": limits, "load_average_end": load_average(), **summary,
                                    "report": reps[-1]["_report"], "du": reps[-1]["_du"]}, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def child(argv: list[str]) -> None:
    if argv[0] == "_build":
        h, i, layers, v, k = map(int, argv[2:7])
        build_family(Path(argv[1]), h, i, layers, v, k, float(argv[7]))
    elif argv[0] == "_limits":
        sample = Path(argv[1])
        print(json.dumps([machine_limits(sample, Path(argv[2])), parameter_count(sample.parent)]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        child(sys.argv[1:])
    else:
        main()
