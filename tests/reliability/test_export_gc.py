"""Exports and gc together: gc never removes the partial directory of a running export.

Exports hold the store's export lock shared; gc removes partial directories only when it can take that
lock exclusively, and otherwise only those nothing wrote to for ``GRACE_SECONDS`` (see
``mmer_cl/checkpoints/export_guard.py``). Trials: gc run from inside a running export (deterministic overlap), gc
and ``export --force`` started together in threads at random offsets, and (natural timing, as the issue
reported it) the two CLI commands started together as processes.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import pytest

from harness import REPO, log_trial, partial_leftovers, pick, tree_digest
from mmer_cl.checkpoints.export_guard import GRACE_SECONDS, MARKER_NAME


def tensor_digests(directory) -> dict[str, str]:
    """sha256 of every tensor of an exported checkpoint (the CLI's export metadata names another actor)."""
    from mmer_cl.checkpoints.checkpoint import Checkpoint
    from mmer_cl.runtime.fingerprint import tensor_digest

    ckpt = Checkpoint(directory)
    return {n: tensor_digest(ckpt.get(n)) for n in ckpt.names()}


def test_gc_inside_a_running_export_leaves_its_partial_directory(trial):
    from mmer_cl.store import Store

    target = trial["exports"] / "vision"
    expected = tree_digest(target)
    seen = []
    with Store.open(trial["store"]) as exporter, Store.open(trial["store"]) as collector:
        def progress(i, n, name):
            if i == 1:
                partial = partial_leftovers(trial["exports"])
                result = collector.gc("t")
                seen.append((partial, result.partial_exports, partial_leftovers(trial["exports"])))

        exporter.export("vision", target, overwrite=True, progress=progress)
    (partial, removed, after), = seen
    assert partial and removed == 0 and after == partial, seen
    assert tree_digest(target) == expected and partial_leftovers(trial["exports"]) == []
    log_trial("export-gc", "gc inside a running export", True)


def test_a_stale_leftover_goes_while_an_export_runs_and_every_one_goes_once_none_runs(trial):
    from mmer_cl.store import Store

    stale = trial["exports"] / ".vision.crashed.partial"
    stale.mkdir()
    (stale / MARKER_NAME).write_text('{"mmer_export": 1}')
    old = time.time() - GRACE_SECONDS - 60
    os.utime(stale / MARKER_NAME, (old, old))
    os.utime(stale, (old, old))
    young = trial["exports"] / ".text.crashed.partial"
    young.mkdir()
    (young / MARKER_NAME).write_text('{"mmer_export": 1}')
    with Store.open(trial["store"]) as s, s._export_lock():  # as if an export were running
        assert s.gc("t").partial_exports == 1
        assert not stale.exists() and young.exists()
    with Store.open(trial["store"]) as s:
        assert s.gc("t").partial_exports == 1 and not young.exists()
    log_trial("export-gc", "grace period while an export runs; all leftovers once none runs", True)


@pytest.mark.parametrize("seed", pick(list(range(10)), list(range(40))))
def test_export_force_and_gc_started_together_in_threads(trial, seed):
    from mmer_cl.store import Store

    rng = random.Random(seed)
    target = trial["exports"] / "vision"
    expected = tree_digest(target)
    errors = []

    def export():
        try:
            with Store.open(trial["store"]) as s:
                s.export("vision", target, overwrite=True, actor="t")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def gc():
        time.sleep(rng.uniform(0, 0.3))
        try:
            with Store.open(trial["store"]) as s:
                s.gc("t")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=export), threading.Thread(target=gc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert tree_digest(target) == expected and partial_leftovers(trial["exports"]) == []
    log_trial("export-gc", f"threads, seed {seed}", True)


@pytest.mark.slow  # two fresh interpreters per trial
@pytest.mark.parametrize("trial_no", pick([0], list(range(12))))
def test_export_force_and_gc_as_two_commands_at_once(trial, trial_no):
    """The issue's reproduction: `mmer export --entry vision --force out/vision` together with `mmer gc`."""
    target = trial["exports"] / "vision"
    expected = tensor_digests(target)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MMER_ACTOR": "reliability"}
    base = [sys.executable, "-m", "mmer_cl.cli", "--store", str(trial["store"]), "-q"]
    export = subprocess.Popen([*base, "export", "--entry", "vision", "--force", str(target)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gc = subprocess.Popen([*base, "gc"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    out_e, err_e = export.communicate(timeout=300)
    out_g, err_g = gc.communicate(timeout=300)
    assert export.returncode == 0, err_e
    assert gc.returncode == 0, err_g
    assert "Traceback" not in err_e + err_g
    assert tensor_digests(target) == expected and partial_leftovers(trial["exports"]) == []
    log_trial("export-gc", f"two processes, trial {trial_no}", True)
