"""The demo's committed storage table is what this code writes: replaying the demo's expansions on the
shipped checkpoints gives the same stored bytes (a codec change that moves them must regenerate the results)."""

import json
import sys
from pathlib import Path

import pytest
import zstandard

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from mmer_family.evaluate import METHODS, ORDER, TASKS, Grid  # noqa: E402

from mmer_cl.store import Store  # noqa: E402

BYTE_FIELDS = ("mask_bytes", "task_vector_archive_bytes", "modality_side_bytes", "modality_side_raw_bytes",
               "full_copy_bytes")


@pytest.fixture(scope="module")
def committed() -> dict:
    results = json.loads((EXAMPLES / "results" / "results.json").read_text())
    written_with, here = results["meta"]["libzstd"], ".".join(map(str, zstandard.ZSTD_VERSION))
    if written_with != here:  # another compressor may write other (equally valid) bytes
        pytest.skip(f"the demo's results were written with libzstd {written_with}, this is {here}: "
                    "rerun `python examples/run_demo.py` to compare")
    return results["results"][0]


def test_replaying_the_demos_expansions_stores_the_bytes_its_results_report(tmp_path, committed):
    checkpoints = EXAMPLES / "checkpoints"
    store = Store.init(tmp_path / "store", checkpoints / "base", actor="test")
    for name in ORDER:
        store.register(checkpoints / f"seed{committed['seed']}" / name, name, TASKS[name].modality, name,
                       actor="test")
    # the demo expands every grid point of every method in this order; which one it chose does not change
    # the blobs of the versions before it
    grid = [p for method in METHODS for p in getattr(Grid(), method)]
    for params in grid[:committed["mmer_version"]]:
        version = store.expand(params, actor="test").version.number
    assert version == committed["mmer_version"]
    assert store.version(version).params == committed["storage"]["params"]

    report = store.report(version)
    stored = committed["storage"]
    assert (report["base_bytes"], report["merged_bytes"], report["merged_raw_bytes"]) == \
        (stored["base_bytes"], stored["merged_bytes"], stored["merged_raw_bytes"])
    for ours, theirs in zip(report["entries"], stored["entries"], strict=True):
        assert ours["name"] == theirs["name"]
        assert {f: ours[f] for f in BYTE_FIELDS} == {f: theirs[f] for f in BYTE_FIELDS}
    store.close()
