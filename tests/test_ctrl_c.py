"""Ctrl-C at any moment of `mmer register`, `expand` and `export`, start-up included (the imports of torch,
numba and scipy take most of a small command's time): exit 130 and one line, or exit 0 when the command had
already finished; never a traceback or an "internal error"; the store audits clean afterwards.

The trials run the CLI as a user does, in a fresh process, and send SIGINT after a fixed delay. The first
tens of milliseconds of a process belong to the Python interpreter's own start-up (its `site` import), before
any mmer code can install a handler: there Python's default applies (a kill by the signal, or a traceback from
`site`), so the delays start at 0.15 s. A signal at delay 0 lands before the interpreter runs at all and kills
the process silently (a shell shows 130); the full grid (MMER_RELIABILITY=full, or `-m slow`) includes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import builders

REPO = Path(__file__).resolve().parents[1]
FAST_DELAYS = [0.15, 0.6, 1.5]
FULL_DELAYS = [0.0, 0.15, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]


@pytest.fixture(scope="module")
def template(family, tmp_path_factory):
    from mmer_cl.store import Store

    root = tmp_path_factory.mktemp("ctrl_c")
    base = builders.save_base(root / "base-again")  # same seed as the family's base: identical tensors
    builders.save_llava(base, root / "speech", seed=4)
    shutil.rmtree(root / "base-again")
    with Store.init(root / "store", family / "base", actor="setup") as s:
        s.register(family / "vision", "vision", "vision", actor="setup")
        s.register(family / "audio", "audio", "audio", actor="setup")
        s.expand(actor="setup")
    return root


def interrupted_run(store: Path, args: list, delay: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MMER_ACTOR": "ctrl-c"}
    env.pop("MMER_DEBUG", None)
    process = subprocess.Popen([sys.executable, "-m", "mmer_cl.cli.entry", "--store", str(store), "-q", *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def trial(template: Path, tmp_path: Path, command: str, delay: float) -> None:
    from mmer_cl.store import Store

    store = tmp_path / "store"
    shutil.copytree(template / "store", store)
    args = {"register": ["register", template / "speech", "--name", "speech", "--modality", "speech"],
            "expand": ["expand", "--density", "0.3"],
            "export": ["export", "--entry", "vision", tmp_path / "out"]}[command]
    with Store.open(store) as s:
        versions_before = len(s.versions())
    result = interrupted_run(store, args, delay)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    where = f"{command} at {delay}s: exit {result.returncode}, stderr {result.stderr!r}"
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, where
    if result.returncode == 130:
        assert len(lines) == 1 and lines[0].startswith("interrupted"), where
    elif result.returncode == -signal.SIGINT:  # before the interpreter ran any code: the system's default
        assert delay == 0.0 and lines == [], where
    else:
        assert result.returncode == 0 and lines == [], where  # finished before the signal
    with Store.open(store) as s:
        report = s.audit()
        assert report.ok, (where, report)
        assert len(s.versions()) in (versions_before, versions_before + 1), where
        names = {e.name for e in s.entries()}
        assert names in ({"vision", "audio"}, {"vision", "audio", "speech"}), where


@pytest.mark.parametrize("command", ["register", "expand", "export"])
@pytest.mark.parametrize("delay", FAST_DELAYS)
def test_ctrl_c_exits_130_with_one_line_and_an_intact_store(template, tmp_path, command, delay):
    trial(template, tmp_path, command, delay)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["register", "expand", "export"])
@pytest.mark.parametrize("delay", [d for d in FULL_DELAYS if d not in FAST_DELAYS])
def test_ctrl_c_at_every_delay_up_to_five_seconds(template, tmp_path, command, delay):
    trial(template, tmp_path, command, delay)


def test_an_interrupt_library_code_turned_into_another_error_is_reported_as_the_interrupt(tmp_path):
    """numba's import, cut by Ctrl-C, raised RecursionError: reported as "internal error", exit 1, before."""
    code = ("import signal, mmer_cl.cli as cli, mmer_cl.runtime.interrupts as i\n"
            "i.remember_interrupts()\n"
            "@cli.cli.command('boom')\n"
            "def boom():\n"
            "    i._requested.set()  # what the handler records, as the signal arrives\n"
            "    raise RecursionError('maximum recursion depth exceeded')\n"
            "cli.main()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MMER_DEBUG", None)
    done = subprocess.run([sys.executable, "-c", code, "boom"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 130, done.stderr
    assert done.stderr.startswith("interrupted") and len(done.stderr.strip().splitlines()) == 1, done.stderr
