"""The evidence pipeline of examples/, reduced to seconds: its invariants, not its accuracy figures."""

import json
import shutil
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import run_demo  # noqa: E402
from mmer_family import data, train  # noqa: E402
from mmer_family.model import load_base  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The demo's --quick path on the shipped base, with freshly trained tiny fine-tunes."""
    root = tmp_path_factory.mktemp("demo")
    shutil.copytree(EXAMPLES / "checkpoints" / "base", root / "ckpt" / "base")
    run_demo.main(["--quick", "--seeds", "0", "--checkpoints", str(root / "ckpt"), "--out", str(root / "out")])
    return root


@pytest.mark.slow
def test_single_entry_store_reconstructs_its_model_exactly(quick_run):
    result = json.loads((quick_run / "out" / "results.json").read_text())["results"][0]
    assert result["single_entry_exact"] is True


@pytest.mark.slow
def test_continual_expansions_after_the_first_are_incremental(quick_run):
    result = json.loads((quick_run / "out" / "results.json").read_text())["results"][0]
    assert result["continual"]["mmer"]["incremental"] == [False, True, True]
    rows = result["continual"]["mmer"]["R"]
    assert [len(r) for r in rows] == [1, 2, 3]
    expected_bwt = ((rows[2][0] - rows[0][0]) + (rows[2][1] - rows[1][1])) / 2
    assert result["continual"]["mmer"]["bwt"] == pytest.approx(expected_bwt)


@pytest.mark.slow
def test_every_method_scores_every_task_and_the_report_is_written(quick_run):
    out = quick_run / "out"
    result = json.loads((out / "results.json").read_text())["results"][0]
    for method in ("task_arithmetic", "average", "ties", "mmer"):
        assert set(result["test"][method]) == {"vision_digit", "audio_digit", "audio_speaker"}
        assert all(0.0 <= a <= 1.0 for a in result["test"][method].values())
    assert all(0.0 < d <= 1.0 for d in result["mask_density"].values())
    assert result["ppl"]["MMER text path (base)"] == result["ppl"]["base"]
    assert "## Task accuracy and retention" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_expansion_scores_every_system_on_mixed_inputs_and_the_text_paths(quick_run):
    result = json.loads((quick_run / "out" / "results.json").read_text())["results"][0]
    exp = result["expansion"]
    default = f"MMER composed, text on {exp['default_text_params']}"
    assert set(exp["test"][default]) == {"clean", "noisy", "image masked", "audio masked"}
    assert any(k.startswith("merged LLM + both encoders") for k in exp["test"])
    assert all(0.0 <= a <= 1.0 for row in exp["test"].values() for a in row.values())
    # the composed model's text path on the base IS the base LLM
    assert exp["ppl"]["base"] == pytest.approx(result["ppl"]["base"], rel=1e-6)
    assert "## Expansion" in (quick_run / "out" / "results.md").read_text()


def test_log_mel_features_have_the_shipped_shape():
    wave = __import__("torch").randn(data.SAMPLE_RATE)
    assert tuple(data.log_mel(wave).shape) == (data.FRAMES, data.N_MELS)
    splits = data.fsdd_splits("digit")
    assert [len(splits[k].y) for k in ("train", "val", "test")] == [2400, 300, 300]


def test_base_pretraining_runs_and_saves_a_loadable_llama(tmp_path):
    train.pretrain_base(tmp_path / "b", steps=2, seq=32, batch=2, train_text=data.shakespeare_heldout()[:5000],
                        log=lambda *_: None)
    assert load_base(tmp_path / "b").config.vocab_size > 60
