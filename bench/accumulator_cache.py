"""What a stored accumulator cache would cost against the fold it saves (issue #11's "merge part flat in k").

    python bench/accumulator_cache.py --models /tmp/bench/models    # a store_bench work dir's models (base, ft1..)
    python bench/accumulator_cache.py --hidden 256 --layers 2 --k 4   # builds a small family first

An incremental expansion recomputes the ties merge by folding every
member's trimmed task vector, in one compiled pass that also computes every
member's mask (``mmer_cl/method/fused.py``). DESIGN.md's incremental form would
instead keep the accumulators ``S+, S-, N+, N-`` of the earlier members and
fold in only the new one, so that the merge reads one task vector. This
script measures, over every float tensor of the model, one tensor at a time
and on one thread (as ``expand`` runs its math):

* the fused merge and masks with k = 3 .. K task vectors (what ``expand``
  pays today);
* for each k, the cache an expansion to k members would read (the
  accumulators of the first k - 1) and write (those of all k): its bytes in
  the store's own codec (sums as float32, counts as uint8) and the time to
  encode and decode it once.

The masks need every earlier member's task vector wherever the merged vector
changes, so a cache would not remove any task vector from the reading: it
replaces part of the fold and adds its own coding.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmer_cl.method import fused  # noqa: E402
from mmer_cl.method.accumulators import TiesAccumulator  # noqa: E402
from mmer_cl.method.merging import apply_trim, trim_threshold  # noqa: E402
from mmer_cl.method.task_vector import task_vector  # noqa: E402
from storage import decode, encode  # noqa: E402


def cache_parts(acc: TiesAccumulator) -> list[torch.Tensor]:
    """The accumulators as a cache would store them: float32 sums, uint8 counts (k < 256)."""
    return [acc.pos_sum, acc.neg_sum, acc.pos_count.to(torch.uint8), acc.neg_count.to(torch.uint8)]


def coded(parts: list[torch.Tensor]) -> tuple[int, float, float]:
    """Bytes, encode seconds and decode seconds of ``parts`` in the store's codec (checked to round-trip)."""
    size, enc, dec = 0, 0.0, 0.0
    for t in parts:
        started = time.perf_counter()
        blob = encode(t)
        encoded = time.perf_counter()
        back = decode(blob)
        dec += time.perf_counter() - encoded
        enc += encoded - started
        size += len(blob)
        if not torch.equal(back, t):
            raise SystemExit("codec round trip failed")
    return size, enc, dec


def measure(models: Path, k: int, density: float) -> dict:
    base_file = models / "base" / "model.safetensors"
    ft_files = [models / f"ft{i}" / "model.safetensors" for i in range(1, k + 1)]
    missing = [str(p) for p in [base_file, *ft_files] if not p.exists()]
    if missing:
        raise SystemExit(f"missing checkpoints: {missing}; pass the models dir of a store_bench run with --k >= {k}")
    sizes = range(3, k + 1)
    fused_s = {n: 0.0 for n in sizes}
    cache = {n: {"bytes": 0, "encode_s": 0.0, "decode_s": 0.0} for n in sizes}
    params = 0
    handles = [safe_open(str(p), "pt") for p in [base_file, *ft_files]]
    base_h, ft_h = handles[0], handles[1:]
    for name in base_h.keys():
        base = base_h.get_tensor(name)
        if not base.is_floating_point():
            continue
        params += base.numel()
        taus = [task_vector(base, h.get_tensor(name)).reshape(-1) for h in ft_h]
        thresholds = [trim_threshold(t, density) for t in taus]
        accs = [TiesAccumulator.zeros(taus[0].shape)]
        for tau, th in zip(taus, thresholds):
            accs.append(accs[-1].add(apply_trim(tau, th)))
        codings = {}  # members -> (bytes, encode s, decode s) of their cache, each coded once
        for n in sizes:
            merged, _ = fused.ties_mmer(taus[:n], thresholds[:n], 1.0, [1.0] * n)  # warm (compiled, pages touched)
            if not torch.equal(merged, accs[n].merged()):  # the cache measured is one the merge could use
                raise SystemExit(f"{name}: the accumulators of {n} members do not give the fused merge's bits")
            started = time.perf_counter()
            fused.ties_mmer(taus[:n], thresholds[:n], 1.0, [1.0] * n)
            fused_s[n] += time.perf_counter() - started
            codings[n] = coded(cache_parts(accs[n]))
            if n > 3:  # an incremental expansion to n members reads the cache of n - 1 and writes that of n
                cache[n]["bytes"] += codings[n][0]
                cache[n]["encode_s"] += codings[n][1]
                cache[n]["decode_s"] += codings[n - 1][2]
        del taus, accs
    return {"params": params, "density": density, "fused_seconds": fused_s, "cache": cache}


def report(r: dict) -> None:
    params = r["params"]
    print(f"{params / 1e6:.1f}M float parameters, density {r['density']}, one thread\n")
    print("| members k | fused merge + masks s | cache written (k) | bits/param | encode s | decode (k-1) s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, seconds in r["fused_seconds"].items():
        c = r["cache"][n]
        if n == 3:
            print(f"| {n} | {seconds:.2f} | (first expansion: none read) | | | |")
            continue
        print(f"| {n} | {seconds:.2f} | {c['bytes'] / 1e9:.3f} GB | {c['bytes'] * 8 / params:.2f} | "
              f"{c['encode_s']:.2f} | {c['decode_s']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, help="a store_bench models dir (base/, ft1/, ...) [build one]")
    ap.add_argument("--k", type=int, default=6, help="members, at least 4")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--hidden", type=int, default=256, help="size of the family built without --models")
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    if args.k < 4:
        ap.error("--k must be at least 4 (the first incremental expansion has 4 members)")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models
        if models is None:
            from store_bench import build_family  # bench/ is on sys.path when run as a script

            models = Path(tmp)
            build_family(models, args.hidden, args.intermediate, args.layers, args.vocab, args.k, 0.0005)
        result = measure(models, args.k, args.density)
    report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
