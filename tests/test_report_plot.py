"""`mmer report --plot`: bytes to serve every entry against measured task retention (--eval) or reconstruction
error, with full copies, LoRA ranks and MMER as points, the better corner marked, an honest title."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmer_cl.cli import cli
from mmer_cl.errors import ConfigError
from mmer_cl.store.report_tables import load_retention, plot_points

DEMO_RESULTS = Path(__file__).resolve().parents[1] / "examples" / "results" / "results.json"


@pytest.fixture(scope="module")
def store(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    runner = CliRunner()
    for args in (["init", "--base", family / "base"],
                 ["register", family / "vision", "--name", "vision", "--modality", "vision"],
                 ["register", family / "audio", "--name", "audio", "--modality", "audio"], ["expand"]):
        assert runner.invoke(cli, ["--store", str(root / "store"), "-q", *map(str, args)]).exit_code == 0
    return root / "store"


def report(store, *args):
    result = CliRunner().invoke(cli, ["--store", str(store), "-q", "report", "--ranks", "4,8", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def test_retention_plot_has_every_kind_of_point_and_says_what_it_measures(store, tmp_path):
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"retention": {"mmer": 0.98, "lora": {"8": 0.93}, "merges": {"ties": 0.85}}}))
    r = json.loads(report(store, "--json", "--no-svd").stdout)
    points, ylabel, title, better = plot_points(r, load_retention(ev))
    by_label = {p[0]: p for p in points}
    assert set(by_label) == {"full copies", "LoRA r=8", "ties merge", "MMER"}
    assert by_label["MMER"][1:3] == (r["mmer_total_bytes"], 0.98)
    assert by_label["full copies"][1:3] == (r["full_copies_total_bytes"], 1.0)
    assert by_label["LoRA r=8"][1] == r["lora"]["8"]["total_bytes"]
    assert "task retention" in ylabel and "retention" in title and "higher" in better[0]
    out = tmp_path / "retention.png"
    report(store, "--no-svd", "--plot", out, "--eval", ev)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_an_evaluation_the_plot_is_of_reconstruction_error_and_says_so(store, tmp_path):
    r = json.loads(report(store, "--json").stdout)
    points, ylabel, title, better = plot_points(r, None)
    labels = [p[0] for p in points]
    assert labels == ["full copies (exact)", "LoRA r=4 (SVD)", "LoRA r=8 (SVD)", "MMER"]
    assert "error" in ylabel and "reconstruction error" in title and "fidelity" not in title
    assert "lower" in better[0]
    out = tmp_path / "error.png"
    report(store, "--plot", out)
    assert out.stat().st_size > 1000


def test_the_demo_results_give_retention_of_mmer_and_the_plain_merges():
    ret = load_retention(DEMO_RESULTS)
    assert 0.9 < ret["mmer"] <= 1.01 and ret["full"] == 1.0
    assert set(ret["merges"]) == {"task_arithmetic", "average", "ties"}
    assert all(v < ret["mmer"] for v in ret["merges"].values())


def test_a_bad_evaluation_file_says_what_to_write(tmp_path, store):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(ConfigError, match='"retention"'):
        load_retention(bad)
    result = CliRunner().invoke(cli, ["--store", str(store), "-q", "report", "--eval", str(bad)])
    assert result.exit_code == 2 and "add --plot" in result.output
