"""The lifelong benchmark: structured fine-tunes as described, and a run that reports every arrival."""

import argparse
import importlib.util
import json
from pathlib import Path

import torch


def _bench_module():
    """bench/lifelong.py under a name of its own: ``import lifelong`` is examples/lifelong.py elsewhere."""
    spec = importlib.util.spec_from_file_location("bench_lifelong", Path(__file__).parents[1] / "bench" / "lifelong.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lifelong = _bench_module()


def test_a_fine_tune_is_a_small_structured_change_with_many_weights_left_bit_identical(tmp_path):
    shapes = lifelong.shapes_of(128, 256, 1, 500, heads=4, kv_heads=2)  # GQA: k and v have 2 heads
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (64, 128)
    config = lifelong.llama_config(128, 256, 1, 500, 4, 2)
    same = lifelong.build_finetune(tmp_path / "ft", shapes, config, 2, 1, 0.02)
    assert 0.1 < same < 0.7  # a realistic share stays bit-identical in bf16
    index = json.loads((tmp_path / "ft" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and set(index["weight_map"]) == set(shapes)
    name = "model.layers.0.mlp.up_proj.weight"
    base = lifelong.base_tensor(name, shapes[name])
    one, two = (lifelong.change(name, base, i, 0.02) for i in (1, 2))
    assert 0.005 < float(one.std() / base.float().std()) < 0.05  # about 2% of the tensor's std
    assert float(torch.nn.functional.cosine_similarity(one.reshape(-1), two.reshape(-1), dim=0)) > 0.1  # the shared part
    assert torch.equal(one, lifelong.change(name, base, 1, 0.02))  # deterministic


def test_a_smoke_run_reports_every_arrival(tmp_path):
    args = argparse.Namespace(hidden=64, intermediate=160, layers=1, vocab=300, heads=0, kv_heads=0, shards=1, n=2,
                              scale=0.02, density=0.2, no_export=False, keep_models=False, work=tmp_path / "w",
                              out=tmp_path / "out.json", plot=False, smoke=False)
    result = lifelong.run(args)
    assert [r["k"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["version_bytes"] > 0 and row["store_bytes"] > row["version_bytes"]
        assert row["expand"]["seconds"] > 0 and row["expand"]["peak_rss"] > 0
        assert row["export_newest"]["seconds"] > 0 and row["export_v1"]["seconds"] > 0
    assert result["summary"]["du_sb"] == result["rows"][-1]["store_bytes"]
