"""The accumulator-cache benchmark measures a cache that reproduces the merge, for every member count."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

import accumulator_cache  # noqa: E402
import store_bench  # noqa: E402


def test_the_cache_it_measures_gives_the_fused_merge_and_grows_with_the_members(tmp_path):
    store_bench.build_family(tmp_path, hidden=64, intermediate=160, layers=1, vocab=300, k=5, noise=0.0005)
    result = accumulator_cache.measure(tmp_path, k=5, density=0.2)  # exits if a cache misses the fused bits
    assert result["params"] == 300 * 64 * 2 + 4 * 64 * 64 + 3 * 64 * 160 + 3 * 64
    assert set(result["fused_seconds"]) == {3, 4, 5}
    sizes = [result["cache"][n]["bytes"] for n in (4, 5)]
    assert 0 < sizes[0] < sizes[1]  # more members, more nonzero sums and counts
