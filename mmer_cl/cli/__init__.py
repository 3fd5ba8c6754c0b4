"""The ``mmer`` command line (click): ``app`` holds the group, global options, failure handling and ``main``.

One module per command group registers its commands on the group when imported (``setup``, ``expand``,
``versions``, ``export``, ``report``); ``entry`` is the console script. May import all of mmer_cl (heavy modules
inside the commands, so ``mmer --help`` loads no torch); nothing outside this package imports it.
"""

from __future__ import annotations

import importlib

# Loaded on first use, so `mmer_cl.cli.entry` installs its Ctrl-C handler before click and the commands load.
_SUBMODULES = frozenset(['app', 'entry', 'expand', 'export', 'report', 'setup', 'versions'])
_COMMAND_MODULES = ('setup', 'expand', 'versions', 'export', 'report')


def __getattr__(name: str):
    """``from mmer_cl.cli import cli, main`` (and the old module's other names): app.py, then the commands."""
    if name in _SUBMODULES or name.startswith("__"):
        raise AttributeError(f"module 'mmer_cl.cli' has no attribute {name!r}")
    app = importlib.import_module("mmer_cl.cli.app")  # importing app registers every command
    for module in (app, *(importlib.import_module(f"mmer_cl.cli.{m}") for m in _COMMAND_MODULES)):
        if name in vars(module):
            value = vars(module)[name]
            globals()[name] = value
            return value
    raise AttributeError(f"module 'mmer_cl.cli' has no attribute {name!r}")
