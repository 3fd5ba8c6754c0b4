"""What the trim tie rule changes (issue #21, item 4), as the README's method section states it.

    python bench/tie_rule_effect.py            # both measurements below (a few minutes)
    python bench/tie_rule_effect.py --no-demo  # the bf16 one only (seconds)

1. On a bf16 fine-tune built by ``bench/lifelong.py`` (hidden 640): the share of positions tied at the
   trim threshold (density 0.2) and, per quarter of the rows, how many of the kept ties each rule takes.
2. On the demo's shipped checkpoints (examples/checkpoints, 3 seeds): every grid point of the demo
   expanded under both rules; how many give bit-identical merged vectors.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def bf16_ties() -> None:
    import lifelong
    from mmer_cl.method.merging import sortable_magnitudes, trim, trim_threshold

    shapes = lifelong.shapes_of(640, 1792, 1, 2000, 10, 10)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        base = lifelong.base_tensor(name, shapes[name])
        tau = (base.float() + lifelong.change(name, base, 1, 0.02)).bfloat16().float() - base.float()
        threshold = trim_threshold(tau, 0.2)
        tied = sortable_magnitudes(tau).reshape(tau.shape) == threshold.bits
        rows = tau.shape[0]
        line = [f"{name}: {float(tied.float().mean()):.1%} of positions tie at the threshold, "
                f"{threshold.ties} of them kept"]
        for rule in ("earliest", "hash"):
            kept = (trim(tau, 0.2, rule, seed=123) != 0) & tied
            line.append(f"{rule} by row quarter " + " / ".join(
                str(int(kept[q * rows // 4:(q + 1) * rows // 4].sum())) for q in range(4)))
        print("; ".join(line))


def demo_merges() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from mmer_family.evaluate import METHODS, ORDER, TASKS, Grid

    from mmer_cl.store import Store

    checkpoints = ROOT / "examples" / "checkpoints"
    for seed in (0, 1, 2):
        merged = {}
        for rule in ("earliest", "hash"):
            with tempfile.TemporaryDirectory() as tmp:
                store = Store.init(Path(tmp) / "store", checkpoints / "base", actor="bench")
                for name in ORDER:
                    store.register(checkpoints / f"seed{seed}" / name, name, TASKS[name].modality, name,
                                   actor="bench")
                merged[rule] = []
                for params in [p for m in METHODS for p in getattr(Grid(), m)]:
                    v = store.expand(dataclasses.replace(params, tie_rule=rule), actor="bench").version
                    merged[rule].append(sorted((r.key, r.digest) for r in store.registry.version_blobs(v.id, "merged")))
                store.close()
        same = sum(a == b for a, b in zip(merged["earliest"], merged["hash"]))
        print(f"demo seed {seed}: {same} of {len(merged['hash'])} grid points give bit-identical merged vectors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-demo", action="store_true")
    args = ap.parse_args()
    bf16_ties()
    if not args.no_demo:
        demo_merges()


if __name__ == "__main__":
    main()
