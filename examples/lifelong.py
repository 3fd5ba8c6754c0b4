"""A lifelong-learning loop with the Python API: models arrive one by one, the store keeps them all.

    python examples/lifelong.py                 # a few seconds of merging, about a minute with scoring
    python examples/lifelong.py --limit 40      # a smoke run

Each arriving fine-tune (the shipped `examples/checkpoints/seed0` models:
handwritten digits, spoken digits, speakers) is registered and the store
expanded; every entry registered so far is then scored through the new
version. The accuracy matrix shows that earlier entries keep their scores as
the store grows (MMER's retention), with no training and nothing forgotten.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from transformers import PreTrainedTokenizerFast  # noqa: E402

from mmer_family.model import TinyMLLM  # noqa: E402
from mmer_family.scoring import accuracy  # noqa: E402
from mmer_family.tasks import TASKS  # noqa: E402

from mmer_cl import MergeParams  # noqa: E402
from mmer_cl.store import Store  # noqa: E402
from mmer_cl.runtime.table import render_table  # noqa: E402

ARRIVALS = ("vision_digit", "audio_digit", "audio_speaker")


def main(argv: list[str] | None = None) -> list[list[float | None]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="Store directory to create [a temporary one].")
    ap.add_argument("--limit", type=int, help="Score on the first N test examples only.")
    ap.add_argument("--checkpoints", type=Path, default=HERE / "checkpoints")
    args = ap.parse_args(argv)
    start = time.time()
    tok = PreTrainedTokenizerFast.from_pretrained(args.checkpoints / "base")
    tests = {}
    for name in ARRIVALS:
        s = TASKS[name].splits()["test"]
        tests[name] = (s.x[:args.limit], s.y[:args.limit]) if args.limit else (s.x, s.y)
    matrix: list[list[float | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        with Store.init(args.store or Path(tmp) / "store", args.checkpoints / "base", actor="lifelong") as store:
            for step, name in enumerate(ARRIVALS):
                # a new model arrives: register it, expand (ties folds only the new task vector in)
                store.register(args.checkpoints / "seed0" / name, name, TASKS[name].modality, name)
                result = store.expand(MergeParams(density=0.5))
                print(f"v{result.version.number}: +{name}"
                      f" ({'incremental' if result.incremental else 'from all task vectors'})")
                row: list[float | None] = []
                for seen in ARRIVALS:
                    if ARRIVALS.index(seen) > step:
                        row.append(None)
                        continue
                    model = store.load(seen, model_class=TinyMLLM, device="cpu")
                    row.append(accuracy(model, tok, TASKS[seen], *tests[seen]))
                matrix.append(row)
    print()
    print(render_table(["after", *ARRIVALS],
                       [[f"v{i + 1} (+{ARRIVALS[i]})", *(f"{a:.1%}" if a is not None else "-" for a in row)]
                        for i, row in enumerate(matrix)]))
    print(f"\n(test accuracy{'' if args.limit is None else f' on {args.limit} examples'}; "
          f"{time.time() - start:.0f} s)")
    return matrix


if __name__ == "__main__":
    main()
