"""`register` is linear in the number of tensors (issue 20, item 5).

A checkpoint of 20,000 tensors (a tiny fine-tune plus zero-size tensors) registers within a generous
multiple of the time one of 200 takes: linear work gives about 100x, the quadratic reading it replaces
(each tensor read parsed its shard's whole header again) gave more than 3,000x. Ratios only, inside one
run, since the machine may be shared; `bench/register_scale.py` gives the absolute figures.
"""

from __future__ import annotations

import importlib.util
import statistics

import pytest

from harness import REPO, log_trial

pytestmark = pytest.mark.slow  # ~10-30 s: 20,000 blobs and registry rows

spec = importlib.util.spec_from_file_location("register_scale", REPO / "bench" / "register_scale.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_register_is_linear_in_the_number_of_tensors(tmp_path):
    small_base, small = bench.build(tmp_path / "small", 200)
    large_base, large = bench.build(tmp_path / "large", 20_000)
    t_small = statistics.median(bench.time_register(small_base, small, tmp_path / f"s{i}") for i in range(3))
    t_large = bench.time_register(large_base, large, tmp_path / "l")
    budget = 300 * t_small + 5.0  # linear: ~100x; the old quadratic reading: > 3,000x
    assert t_large < budget, f"20,000 tensors took {t_large:.1f} s, 200 took {t_small:.2f} s (budget {budget:.1f} s)"
    from mmer_cl.store import Store

    with Store.open(tmp_path / "l") as store:
        entry = store.entries()[0]
        assert len(store.registry.entry_blobs(entry.id, "own")) >= 19_000  # every tensor kept
    log_trial("scale", f"register 20,000 tensors in {t_large:.1f} s (200: {t_small:.2f} s)", True)
