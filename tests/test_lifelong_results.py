"""The committed lifelong table is what the shipped checkpoints give: a replay of its first arrivals (seed 0)
through the store, the 1-bit deltas and the sequential chain reproduces the committed accuracies, and every
summary figure in the table follows from the committed accuracy matrices."""

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
import zstandard

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from lifelong_family.evaluate import MERGES, SYSTEMS, Family, bitdelta_model  # noqa: E402
from lifelong_family.tasks import ORDER, TASKS  # noqa: E402
from mmer_family.model import TinyMLLM  # noqa: E402

from mmer_cl import MergeParams  # noqa: E402
from mmer_cl.store import Store  # noqa: E402

ARRIVALS = 4  # vision_digit, audio_digit, audio_speaker, tabular_cancer (the first compact checkpoint)


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((EXAMPLES / "results" / "lifelong.json").read_text())


@pytest.fixture(scope="module")
def seed0(committed) -> dict:
    result = committed["results"][0]
    assert result["seed"] == 0 and result["order"] == list(ORDER)
    return result


@pytest.fixture(scope="module")
def family() -> Family:
    torch.set_num_threads(1)
    return Family(EXAMPLES / "checkpoints", 0)


def test_replaying_mmers_arrivals_through_the_store_reproduces_the_committed_accuracies(tmp_path, committed, seed0,
                                                                                        family):
    params = MergeParams.from_dict(committed["meta"]["selection"]["chosen"]["mmer"])
    store = Store.init(tmp_path / "mmer", family.base_dir, actor="test")
    for t, name in enumerate(ORDER[:ARRIVALS], start=1):
        store.register(family.checkpoint_dir(name, tmp_path / "ckpt"), name, TASKS[name].modality, name, actor="test")
        assert store.expand(params, actor="test").incremental == seed0["incremental"][t - 1]
    row = [family.score(store.load(n, model_class=TinyMLLM, device="cpu"), n) for n in ORDER[:ARRIVALS]]
    assert row == seed0["R"]["mmer"][ARRIVALS - 1]
    report = store.report(ranks=(8,), svd=False)
    if committed["meta"]["libzstd"] == ".".join(map(str, zstandard.ZSTD_VERSION)):  # coded bytes: same codec only
        assert report["deployment"] == seed0["mmer_report"][ARRIVALS - 1]["deployment"]
    store.close()


def test_one_bit_deltas_and_the_originals_reproduce_the_committed_accuracies(seed0, family):
    for t, name in enumerate(ORDER[:ARRIVALS]):
        model = family.model(name)
        assert family.score(model, name) == seed0["original"][name]
        assert family.score(bitdelta_model(model, family.base_state), name) == seed0["R"]["bitdelta"][-1][t]


def test_the_sequential_chain_reproduces_the_committed_accuracies(seed0, family):
    t = 4  # the chain's LLM after tabular_cancer, with vision_digit's and tabular_cancer's own encoders
    llm = family.chain(t).language_model.state_dict()
    for j in (1, 4):
        model = family.chain(j)
        model.language_model.load_state_dict(llm)
        assert family.score(model, ORDER[j - 1]) == seed0["R"]["sequential"][t - 1][j - 1]


def test_every_summary_figure_follows_from_the_accuracy_matrices(committed):
    for r in committed["results"]:
        n = len(r["order"])
        orig = [r["original"][e] for e in r["order"]]
        assert r["R"]["copies"] == [orig[:t] for t in range(1, n + 1)]
        for s in SYSTEMS:
            rows = r["R"][s]
            assert [len(row) for row in rows] == list(range(1, n + 1))
            for t in range(n):
                ret = statistics.mean(a / o for a, o in zip(rows[t], orig))
                assert r["mean_retention"][s][t] == pytest.approx(ret)
                bwt = statistics.mean(rows[t][j] - rows[j][j] for j in range(t)) if t else 0.0
                assert r["bwt"][s][t] == pytest.approx(bwt)
                bits = 8 * r["llm_bytes"][s][t] / ((t + 1) * r["llm_params"])
                assert r["bits_per_param"][s][t] == pytest.approx(bits)
        # bytes that need no measuring: one float32 LLM, t of them, or the base plus t 1-bit deltas
        p = r["llm_params"]
        for t in range(1, n + 1):
            assert r["llm_bytes"]["copies"][t - 1] == 4 * p * t
            assert all(r["llm_bytes"][m][t - 1] == 4 * p for m in (*MERGES, "sequential"))
            assert r["llm_bytes"]["bitdelta"][t - 1] == 4 * p + t * r["bitdelta_entry_bytes"]
        # 1-bit deltas and full copies do not forget: an entry's accuracy never changes after it arrives
        for s in ("bitdelta", "copies"):
            assert all(r["R"][s][t][j] == r["R"][s][j][j] for t in range(n) for j in range(t + 1))
        assert r["ppl"]["mmer"] == [r["base_ppl"]] * n  # text-only inputs on the base


def test_the_markdown_table_shows_the_committed_final_mean_retention(committed):
    from mmer_family.report import ms

    text = (EXAMPLES / "results" / "lifelong.md").read_text()
    results = committed["results"]
    final = text.split("## After the last arrival")[1]
    for s in SYSTEMS:
        assert ms([r["mean_retention"][s][-1] for r in results]) in final
