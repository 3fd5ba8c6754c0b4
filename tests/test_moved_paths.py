"""Old import paths keep working for one release (0.3), with a DeprecationWarning naming the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

from mmer_cl._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_gives_the_same_module(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is new and module.__name__ == MOVED[old] and module.__spec__.name == MOVED[old]
    assert [w.category for w in caught] == [DeprecationWarning]
    assert str(caught[0].message) == f"{old} moved to {MOVED[old]}; the old path goes away in 0.4"
    assert caught[0].filename == __file__  # the warning points at the importing line


def test_old_from_imports_and_the_public_api_still_work():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "from mmer_cl import Store, MergeParams, merge_checkpoints, Checkpoint, KeyMap, map_keys\n"
            "from mmer_cl.store import Store as S, StoreError, RegisterResult, ExpandResult, AuditReport\n"
            "from mmer_cl.cli import cli, main\n"
            "import mmer_cl.store as store\n"
            "assert S is Store and store.Store is Store and issubclass(StoreError, Exception)\n"
            "warnings.simplefilter('ignore', DeprecationWarning)\n"
            "from mmer_cl.merging import ties\n"
            "from mmer_cl import merging\n"
            "import mmer_cl.method.merging as new\n"
            "assert merging is new and ties is new.ties\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
