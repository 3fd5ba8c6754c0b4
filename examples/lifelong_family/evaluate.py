"""The lifelong table: entries arrive one at a time; after each arrival every system serves all of them.

Systems, after arrival t (entries 1..t present):

* ``mmer``: one store; the new entry is registered and the store expanded
  (``Store.expand``, incremental ties); entry j is served by
  ``Store.load(j)`` = base + mask_j * merged, plus its own encoder;
* ``task_arithmetic``, ``ties``, ``average``: one merged LLM for all t
  entries, each with its own encoder (``Store.load(j, use_mask=False)``),
  from a second store;
* ``bitdelta``: per entry, base + sign(tau) * mean|tau| per tensor (1 bit per
  LLM parameter and one float32 scale per tensor);
* ``sequential``: one LLM fine-tuned on the entries one after another (the
  chain shipped under ``lifelong/seed{s}/sequential``); entry j uses the
  chain's LLM at step t with the encoder it was trained with at step j;
* ``copies``: every fine-tune kept whole (the upper bound).

Merge hyperparameters are chosen once (``validate``, ``choose``), on seed 0's validation
splits with all entries present, and then used unchanged for every arrival
and seed. Test splits are scored only with those.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from lifelong_family.compact import _base_state
from lifelong_family.tasks import ORDER, TASKS, splits
from lifelong_family.train import chain_path, entry_path, load_entry
from mmer_cl import MergeParams
from mmer_cl.store import Store
from mmer_family.data import Split, shakespeare_heldout
from mmer_family.model import TinyMLLM, load_base
from mmer_family.scoring import accuracy, perplexity

SYSTEMS = ("mmer", "task_arithmetic", "ties", "average", "bitdelta", "sequential", "copies")
MERGES = ("task_arithmetic", "ties", "average")
LABELS = {"mmer": "MMER", "task_arithmetic": "task arithmetic", "ties": "TIES", "average": "averaging",
          "bitdelta": "1-bit deltas", "sequential": "sequential fine-tuning", "copies": "full copies"}
PPL_WINDOWS = 100
ACTOR = "lifelong"


@dataclass
class Grid:
    """Candidate parameters per merge method, searched once on validation."""

    mmer: tuple = tuple(MergeParams(method="ties", density=d, lam=lam) for d in (0.2, 0.5, 1.0)
                        for lam in (0.5, 0.75, 1.0))
    task_arithmetic: tuple = tuple(MergeParams(method="task_arithmetic", alpha=a) for a in (0.1, 0.2, 0.3, 0.5, 0.7))
    ties: tuple = tuple(MergeParams(method="ties", density=d, alpha=a) for d in (0.2, 0.5, 1.0)
                        for a in (0.7, 1.0, 1.5))
    average: tuple = (MergeParams(method="average"),)

    @classmethod
    def quick(cls) -> "Grid":
        return cls(mmer=(MergeParams(density=0.5, lam=0.5), MergeParams(density=0.5, lam=1.0)),
                   task_arithmetic=(MergeParams(method="task_arithmetic", alpha=0.3),),
                   ties=(MergeParams(method="ties", density=0.5),))


def limit_split(split: Split, n: int | None) -> Split:
    return split if n is None else Split(split.x[:n], split.y[:n])


class Family:
    """One seed's entries: paths, the tokenizer, the base, and scoring."""

    def __init__(self, root: Path, seed: int, order: tuple[str, ...] = ORDER, limit: int | None = None):
        self.root, self.seed, self.order, self.limit = root, seed, order, limit
        self.base_dir = root / "base"
        self.tok = PreTrainedTokenizerFast.from_pretrained(self.base_dir)
        self.base_state = _base_state(self.base_dir)
        self.text = shakespeare_heldout()
        self.windows = PPL_WINDOWS if limit is None else 5

    def path(self, name: str) -> Path:
        return entry_path(self.root, self.seed, name)

    def model(self, name: str) -> TinyMLLM:
        return load_entry(self.path(name), self.base_dir, self.base_state)

    def chain(self, t: int) -> TinyMLLM:
        return load_entry(chain_path(self.root, self.seed, t), self.base_dir, self.base_state)

    def score(self, model, name: str, split: str = "test") -> float:
        s = limit_split(splits(name)[split], self.limit)
        return accuracy(model, self.tok, TASKS[name], s.x, s.y)

    def ppl(self, llm) -> float:
        return perplexity(llm, self.tok, self.text, windows=self.windows)

    def checkpoint_dir(self, name: str, cache: Path) -> Path:
        """A standard checkpoint directory of the entry (the compact ones written out once into ``cache``)."""
        from lifelong_family.compact import materialize

        path = self.path(name)
        if path.suffix != ".safetensors":
            return path
        out = cache / f"seed{self.seed}" / name
        if not (out / "config.json").exists():
            materialize(path, self.base_dir, out, self.base_state)
        return out


# ---- 1-bit deltas ------------------------------------------------------------------------------
def bitdelta_llm(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """base + sign(tau) * mean|tau| per tensor; a zero difference takes the bit of -1 (1 bit cannot hold 0)."""
    out = {}
    for key, b in base.items():
        tau = tuned[key].double() - b.double()
        scale = tau.abs().mean()
        out[key] = (b.double() + torch.where(tau > 0, scale, -scale)).to(b.dtype)
    return out


def bitdelta_bytes(base: dict[str, torch.Tensor]) -> int:
    """Bytes of one entry's 1-bit delta: packed signs plus one float32 scale per tensor."""
    return sum(math.ceil(t.numel() / 8) + 4 for t in base.values())


def bitdelta_model(model: TinyMLLM, base: dict[str, torch.Tensor]) -> TinyMLLM:
    model.language_model.load_state_dict(bitdelta_llm(base, model.language_model.state_dict()))
    return model


# ---- bytes ---------------------------------------------------------------------------------------
def side_bytes(model: TinyMLLM) -> int:
    """float32 bytes of the entry's encoder and projector (every system keeps them unchanged)."""
    return 4 * sum(p.numel() for n, p in model.state_dict().items() if not n.startswith("language_model."))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- validation: the merge parameters, once ----------------------------------------------------------------
def grid_points(grid: Grid) -> list[tuple[str, MergeParams]]:
    return [(m, p) for m in ("mmer", *MERGES) for p in getattr(grid, m)]


def validate(family: Family, points: list[tuple[str, MergeParams]], work: Path, val_limit: int | None,
             progress) -> list[float]:
    """Mean validation accuracy over all entries of ``family`` at each (method, params) point, through a store."""
    vals = []
    with Store.init(work / "select", family.base_dir, actor=ACTOR) as store:
        for name in family.order:
            store.register(family.checkpoint_dir(name, work / "ckpt"), name, TASKS[name].modality, name, actor=ACTOR)
        for method, params in points:
            v = store.expand(params, actor=ACTOR).version.number
            accs = []
            for name in family.order:
                model = store.load(name, version=v, model_class=TinyMLLM, device="cpu", use_mask=method == "mmer")
                s = limit_split(splits(name)["val"], val_limit)
                accs.append(accuracy(model, family.tok, TASKS[name], s.x, s.y))
            vals.append(statistics.mean(accs))
            progress(f"validation: {method} {_short(params)}: mean val accuracy {vals[-1]:.3f}")
    return vals


def choose(points: list[tuple[str, MergeParams]], vals: list[float], seed: int, val_limit: int | None) -> dict:
    """Per method, the point of best mean validation accuracy (the first in grid order on a tie)."""
    chosen, table = {}, {}
    for (method, params), val in zip(points, vals, strict=True):
        table.setdefault(method, []).append({"params": params.to_dict(), "val": val})
        if method not in chosen or val > chosen[method][1]:
            chosen[method] = (params, val)
    return {"chosen": {m: p.to_dict() for m, (p, _) in chosen.items()}, "grid": table, "seed": seed,
            "val_limit": val_limit}


def _short(params: MergeParams) -> str:
    if params.method == "task_arithmetic":
        return f"alpha {params.alpha}"
    if params.method == "average":
        return ""
    return f"density {params.density} alpha {params.alpha} lambda {params.lam}"


# ---- the lifelong run of one seed ------------------------------------------------------------------------
def run_seed(family: Family, chosen: dict, work: Path, progress, export: bool = True) -> dict:
    """Every system's accuracy matrix, text perplexity and bytes after each arrival, for one seed."""
    order, n_llm = family.order, sum(t.numel() for t in family.base_state.values())
    base_ppl = family.ppl(load_base(family.base_dir))
    out = {"seed": family.seed, "order": list(order), "llm_params": n_llm, "base_ppl": base_ppl,
           "original": {}, "R": {s: [] for s in SYSTEMS}, "ppl": {s: [] for s in SYSTEMS},
           "llm_bytes": {s: [] for s in SYSTEMS}, "total_bytes": {s: [] for s in SYSTEMS}, "mmer_report": [],
           "incremental": [], "oneshot": {"llm_bytes": [], "total_bytes": [], "deployment": []}}
    originals, sides, own_ppl, bitdelta_acc = {}, {}, {}, {}
    params = {m: MergeParams.from_dict(chosen[m]) for m in ("mmer", *MERGES)}
    ckpt_cache = work / "ckpt"
    mmer = Store.init(work / "mmer", family.base_dir, actor=ACTOR)
    merged = Store.init(work / "merges", family.base_dir, actor=ACTOR)
    started = time.time()
    for t, name in enumerate(order, start=1):
        seen = order[:t]
        model = family.model(name)
        originals[name] = family.score(model, name)
        sides[name] = side_bytes(model)
        own_ppl[name] = family.ppl(model.language_model)
        bitdelta_acc[name] = family.score(bitdelta_model(model, family.base_state), name)
        path = family.checkpoint_dir(name, ckpt_cache)
        mmer.register(path, name, TASKS[name].modality, name, actor=ACTOR)
        merged.register(path, name, TASKS[name].modality, name, actor=ACTOR)
        side_total = sum(sides[n] for n in seen)

        res = mmer.expand(params["mmer"], actor=ACTOR)
        out["incremental"].append(res.incremental)
        v = res.version.number
        out["R"]["mmer"].append([family.score(mmer.load(n, version=v, model_class=TinyMLLM, device="cpu"), n)
                                 for n in seen])
        out["ppl"]["mmer"].append(base_ppl)  # text-only inputs run on the base (DESIGN.md)
        report = mmer.report(v, ranks=(8,), svd=False)
        dep = report["deployment"]
        # the store's blobs on disk (the registry's SQLite file and directory entries vary by a few KB per run)
        blobs = {k: v for k, v in report["on_disk"].items() if k not in ("registry", "directories_and_other", "total")}
        out["mmer_report"].append({"deployment": dep, "blob_bytes": blobs, "blob_total": sum(blobs.values()),
                                   "lora8_total_bytes": report["lora"]["8"]["total_bytes"] if "8" in report["lora"]
                                   else report["lora"][8]["total_bytes"],
                                   "mask_density": {e["name"]: e["mask_density"] for e in report["entries"]},
                                   "mask_bytes": {e["name"]: e["mask_bytes"] for e in report["entries"]}})
        out["llm_bytes"]["mmer"].append(dep["base"] + dep["merged"] + dep["masks"])
        out["total_bytes"]["mmer"].append(dep["total"])
        # the same t entries in a store expanded once: one version, written whole (no chain of earlier ones)
        with Store.init(work / f"oneshot{t}", family.base_dir, actor=ACTOR) as fresh:
            for n in seen:
                fresh.register(family.checkpoint_dir(n, ckpt_cache), n, TASKS[n].modality, n, actor=ACTOR)
            one = fresh.report(fresh.expand(params["mmer"], actor=ACTOR).version.number, ranks=(), svd=False)
        shutil.rmtree(work / f"oneshot{t}")
        dep = one["deployment"]
        out["oneshot"]["llm_bytes"].append(dep["base"] + dep["merged"] + dep["masks"])
        out["oneshot"]["total_bytes"].append(dep["total"])
        out["oneshot"]["deployment"].append(dep)

        for method in MERGES:
            v = merged.expand(params[method], actor=ACTOR).version.number
            row, llm = [], None
            for n in seen:
                m = merged.load(n, version=v, model_class=TinyMLLM, device="cpu", use_mask=False)
                row.append(family.score(m, n))
                llm = m.language_model
            out["R"][method].append(row)
            out["ppl"][method].append(family.ppl(llm))
            out["llm_bytes"][method].append(4 * n_llm)
            out["total_bytes"][method].append(4 * n_llm + side_total)

        out["R"]["bitdelta"].append([bitdelta_acc[n] for n in seen])
        out["ppl"]["bitdelta"].append(base_ppl)  # the base is stored anyway: text-only inputs run on it
        out["llm_bytes"]["bitdelta"].append(4 * n_llm + t * bitdelta_bytes(family.base_state))
        out["total_bytes"]["bitdelta"].append(out["llm_bytes"]["bitdelta"][-1] + side_total)

        chain_llm = family.chain(t).language_model.state_dict()
        row = []
        for j, n in enumerate(seen, start=1):
            m = family.chain(j)
            m.language_model.load_state_dict(chain_llm)
            row.append(family.score(m, n))
        out["R"]["sequential"].append(row)
        out["ppl"]["sequential"].append(family.ppl(m.language_model))
        out["llm_bytes"]["sequential"].append(4 * n_llm)
        out["total_bytes"]["sequential"].append(4 * n_llm + side_total)

        out["R"]["copies"].append([originals[n] for n in seen])
        out["ppl"]["copies"].append(statistics.mean(own_ppl[n] for n in seen))  # text sent to an entry's copy
        out["llm_bytes"]["copies"].append(t * 4 * n_llm)
        out["total_bytes"]["copies"].append(t * 4 * n_llm + side_total)

        rets = {s: mean_retention(out["R"][s][-1], [originals[n] for n in seen]) for s in SYSTEMS}
        progress(f"seed {family.seed}, arrival {t}/{len(order)} (+{name}): mean retention " +
                 ", ".join(f"{LABELS[s]} {100 * r:.1f}%" for s, r in rets.items()) +
                 f"  [{time.time() - started:.0f}s this seed]")
    out["original"] = originals
    out["test_sizes"] = {n: len(limit_split(splits(n)["test"], family.limit).y) for n in order}
    out["own_ppl"] = own_ppl
    out["side_bytes"] = sides
    out["bitdelta_entry_bytes"] = bitdelta_bytes(family.base_state)
    if export:  # one export of each kind: MMER's from the store, the others' a saved fine-tune
        target = work / "export-mmer"
        mmer.export(order[0], target, actor=ACTOR)
        out["export_bytes"] = {"mmer": dir_bytes(target)}
        target = work / "export-model"
        family.model(order[0]).save_pretrained(target)
        family.tok.save_pretrained(target)
        out["export_bytes"]["model"] = dir_bytes(target)
    mmer.close()
    merged.close()
    summarize(out)
    return out


def mean_retention(row: list[float], originals: list[float]) -> float:
    return statistics.mean(a / max(o, 1e-9) for a, o in zip(row, originals, strict=True))


def backward_transfer(rows: list[list[float]]) -> float:
    """Mean over earlier entries of (accuracy now - accuracy just after it arrived); minus forgetting."""
    t = len(rows)
    if t < 2:
        return 0.0
    return statistics.mean(rows[-1][j] - rows[j][j] for j in range(t - 1))


def summarize(out: dict) -> None:
    """Retention, mean retention, BWT and bits per LLM parameter per entry, after every arrival."""
    order, n = out["order"], out["llm_params"]
    orig = [out["original"][name] for name in order]
    out["retention"], out["mean_retention"], out["bwt"], out["bits_per_param"], out["total_bits_per_param"] = \
        {}, {}, {}, {}, {}
    for s in SYSTEMS:
        rows = out["R"][s]
        out["retention"][s] = [[a / max(o, 1e-9) for a, o in zip(row, orig)] for row in rows]
        out["mean_retention"][s] = [mean_retention(row, orig[:len(row)]) for row in rows]
        out["bwt"][s] = [backward_transfer(rows[:t]) for t in range(1, len(rows) + 1)]
        out["bits_per_param"][s] = [8 * b / (t * n) for t, b in enumerate(out["llm_bytes"][s], start=1)]
        out["total_bits_per_param"][s] = [8 * b / (t * n) for t, b in enumerate(out["total_bytes"][s], start=1)]
    out["oneshot"]["bits_per_param"] = [8 * b / (t * n) for t, b in enumerate(out["oneshot"]["llm_bytes"], start=1)]
