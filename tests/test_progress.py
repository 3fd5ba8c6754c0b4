"""Progress of store commands: a bar with ETA in a terminal, periodic one-line reports in a log, nothing with -q."""

from __future__ import annotations

import io
import re

from click.testing import CliRunner

from mmer_cl.cli import cli
from mmer_cl.runtime.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_lines_report_step_percent_and_elapsed_time():
    log = io.StringIO()
    with Progress("expanding", quiet=False, stream=log, interval=0) as bar:
        for step in range(1, 5):
            bar(step, 4, f"t{step}")
    lines = log.getvalue().splitlines()
    assert lines[0] == "expanding: 0/4 (0%), started"
    assert re.fullmatch(r"expanding: 2/4 \(50%\), \d+\.\d s elapsed, about \d+\.\d s left", lines[2])
    assert re.fullmatch(r"expanding: 4/4 \(100%\), done in \d+\.\d s", lines[-1])


def test_lines_are_spaced_by_the_interval():
    log = io.StringIO()
    with Progress("exporting", quiet=False, stream=log, interval=3600) as bar:
        for step in range(1, 101):
            bar(step, 100, "")
    assert len(log.getvalue().splitlines()) == 2  # the start and the end only


def test_a_terminal_gets_a_bar_with_percent_and_eta():
    screen = Terminal()
    with Progress("registering vision", quiet=False, stream=screen) as bar:
        for step in range(1, 11):
            bar(step, 10, "")
    shown = screen.getvalue()
    assert "registering vision" in shown and "100%" in shown and "10/10" in shown


def test_quiet_prints_nothing():
    log = io.StringIO()
    with Progress("expanding", quiet=True, stream=log, interval=0) as bar:
        bar(1, 2, "")
        bar(2, 2, "")
    assert log.getvalue() == ""


def test_store_commands_report_progress_in_a_log_and_not_with_quiet(family, tmp_path, monkeypatch):
    monkeypatch.setenv("MMER_PROGRESS_SECONDS", "0")
    runner = CliRunner()
    store = ["--store", str(tmp_path / "store")]
    assert runner.invoke(cli, [*store, "-q", "init", "--base", str(family / "base")]).exit_code == 0
    result = runner.invoke(cli, [*store, "register", str(family / "vision"), "--name", "vision", "--modality",
                                 "vision"])
    assert result.exit_code == 0, result.output
    assert "registering vision: 0/" in result.stderr and "(100%), done in" in result.stderr
    result = runner.invoke(cli, [*store, "expand"])
    assert result.exit_code == 0 and "expanding: " in result.stderr and "elapsed" in result.stderr
    result = runner.invoke(cli, [*store, "-q", "export", "--entry", "vision", str(tmp_path / "out")])
    assert result.exit_code == 0 and result.stderr == ""
