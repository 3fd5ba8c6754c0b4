"""Rerun only the expansion evidence, with the merge hyperparameters a full demo run chose on validation.

    python examples/expansion_only.py [--results examples/results]

Reads ``results.json`` (the chosen parameters per seed and method), builds each
seed's store with exactly those versions, runs ``mmer_family.expansion`` and
writes the expansion results back into ``results.json`` / ``results.md``.
``run_demo.py`` does the same inside its full run; this is the cheap path.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mmer_cl import MergeParams  # noqa: E402
from mmer_cl.store import Store  # noqa: E402
from mmer_family import expansion  # noqa: E402
from mmer_family.data import shakespeare_heldout  # noqa: E402
from mmer_family.evaluate import METHODS, ORDER  # noqa: E402
from mmer_family.report import markdown  # noqa: E402
from mmer_family.tasks import TASKS  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, default=HERE / "checkpoints")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    transformers.utils.logging.disable_progress_bar()
    data = json.loads((args.results / "results.json").read_text())
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(args.checkpoints / "base")
    text = shakespeare_heldout()
    for r in data["results"]:
        seed_dir = args.checkpoints / f"seed{r['seed']}"
        with tempfile.TemporaryDirectory() as tmp, Store.init(Path(tmp) / "s", args.checkpoints / "base",
                                                                actor="demo") as store:
            for name in ORDER:
                store.register(seed_dir / name, name, TASKS[name].modality, name, actor="demo")
            versions = {m: store.expand(MergeParams.from_dict(r["chosen"][m]), actor="demo").version.number
                        for m in METHODS}
            started = time.process_time()
            r["expansion"] = expansion.evaluate(store, versions, seed_dir, tok, text, 200, None)
            r["expansion"]["cpu_seconds"] = round(time.process_time() - started, 1)
        print(f"seed {r['seed']} done ({r['expansion']['cpu_seconds']} CPU s)")
    (args.results / "results.json").write_text(json.dumps(data, indent=1, default=str))
    (args.results / "results.md").write_text(markdown(data["results"], data["meta"]))
    print("\n".join(expansion.markdown(data["results"])))


if __name__ == "__main__":
    main()
