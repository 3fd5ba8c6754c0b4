"""The lifelong family's pieces (data, compact checkpoints, 1-bit deltas) and, slow, its --quick run end to end."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from lifelong_family import data  # noqa: E402
from lifelong_family.compact import load_compact, save_compact  # noqa: E402
from lifelong_family.evaluate import SYSTEMS, bitdelta_bytes, bitdelta_llm  # noqa: E402
from lifelong_family.tasks import ENCODER_HIDDEN, NEW, ORDER, TASKS, splits  # noqa: E402
from mmer_family.model import TinyMLLM, TinyMLLMConfig, load_base  # noqa: E402

BASE = EXAMPLES / "checkpoints" / "base"


def test_the_family_has_eight_entries_in_six_modalities_and_fixed_splits():
    assert len(ORDER) == 8 and len({TASKS[n].modality for n in ORDER}) == 6
    for name in NEW:
        a, b = TASKS[name].splits(), TASKS[name].splits()
        for split in ("train", "val", "test"):
            assert torch.equal(a[split].x, b[split].x) and torch.equal(a[split].y, b[split].y)
            assert tuple(a[split].x.shape[1:]) == TASKS[name].feature_shape
            assert set(a[split].y.tolist()) == set(range(len(TASKS[name].labels)))


def test_generated_splits_do_not_share_examples():
    for name in ("timeseries_wave", "pointcloud_shape", "tabular_cancer"):
        s = splits(name)
        train = {tuple(x.flatten().tolist()) for x in s["train"].x}
        assert not any(tuple(x.flatten().tolist()) in train for x in s["test"].x)


def test_videos_are_built_from_their_own_splits_images_and_the_label_is_the_most_frequent_digit():
    images = data.digits_splits()
    for split in ("val", "test"):
        videos, pool = splits("video_digit")[split], images[split]
        for x, y in zip(videos.x[:20], videos.y[:20]):
            frames = [int(((pool.x - f).abs().sum(1) == 0).nonzero()[0]) for f in x]  # each frame is a pool image
            digits = pool.y[frames].tolist()
            assert max(set(digits), key=digits.count) == int(y) and digits.count(int(y)) == 3


def test_a_compact_checkpoint_reloads_the_quantised_model_exactly(tmp_path):
    torch.manual_seed(0)
    base = load_base(BASE)
    cfg = TinyMLLMConfig(text_config=base.config, modality="pointcloud", feature_shape=(64, 3),
                         encoder_hidden=ENCODER_HIDDEN["pointcloud_shape"])
    model = TinyMLLM(cfg)
    model.language_model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in model.language_model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_compact(model, BASE, tmp_path / "m.safetensors")
    after = model.state_dict()
    base_state = base.state_dict()
    for k in before:  # the LLM moved by at most half an int8 step of its row's largest difference
        if k.startswith("language_model."):
            delta = before[k] - base_state[k[len("language_model."):]]
            step = delta.reshape(delta.shape[0], -1).abs().amax(1) / 127
            error = (before[k] - after[k]).reshape(delta.shape[0], -1).abs().amax(1)
            assert bool((error <= step / 2 + 1e-7).all()), k
    reloaded = load_compact(tmp_path / "m.safetensors", BASE)
    assert all(torch.equal(reloaded.state_dict()[k], after[k]) for k in after)
    assert (tmp_path / "m.safetensors").stat().st_size < 0.35 * 4 * sum(v.numel() for v in after.values())


def test_one_bit_deltas_are_base_plus_sign_times_mean_absolute_difference():
    base = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, 0.5, 0.5])}
    tuned = {"w": torch.tensor([[1.5, 1.0], [3.0, 4.3]]), "b": torch.tensor([0.7, 0.5, 0.4])}
    out = bitdelta_llm(base, tuned)
    scale_w = (0.5 + 1.0 + 0.0 + 0.3) / 4
    assert torch.allclose(out["w"], torch.tensor([[1 + scale_w, 2 - scale_w], [3 - scale_w, 4 + scale_w]]))
    scale_b = (0.2 + 0.0 + 0.1) / 3
    assert torch.allclose(out["b"], torch.tensor([0.5 + scale_b, 0.5 - scale_b, 0.5 - scale_b]))
    assert bitdelta_bytes(base) == (1 + 4) + (1 + 4)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import run_lifelong

    root = tmp_path_factory.mktemp("lifelong")
    shutil.copytree(BASE, root / "ckpt" / "base")
    run_lifelong.main(["--quick", "--seeds", "0", "--jobs", "1", "--checkpoints", str(root / "ckpt"),
                       "--out", str(root / "out")])
    return root


@pytest.mark.slow
def test_the_quick_run_trains_the_family_and_writes_the_table(quick_run):
    out = quick_run / "out"
    result = json.loads((out / "lifelong.json").read_text())["results"][0]
    n = len(ORDER)
    assert result["incremental"] == [False] + [True] * (n - 1)  # MMER folds each arrival in
    for s in SYSTEMS:
        assert [len(row) for row in result["R"][s]] == list(range(1, n + 1))
        assert all(0.0 <= a <= 1.0 for row in result["R"][s] for a in row)
    originals = [result["original"][name] for name in ORDER]
    assert result["R"]["copies"] == [originals[:t] for t in range(1, n + 1)]  # full copies are the originals
    assert result["R"]["bitdelta"][-1][:1] == result["R"]["bitdelta"][0]  # a 1-bit delta never changes later
    assert result["oneshot"]["llm_bytes"][0] > 0
    assert (quick_run / "ckpt" / "lifelong" / "seed0" / "sequential" / f"{n}_{ORDER[-1]}.safetensors").exists()
    assert "## Mean retention after each arrival" in (out / "lifelong.md").read_text()
    assert (out / "lifelong.png").read_bytes()[:4] == b"\x89PNG"
