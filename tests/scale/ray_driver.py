"""A `mmer expand --ray` driver for tests: the real CLI, with a group function that crashes the worker
(``crash``) or waits (``slow``, after writing ``FLAG``), on a local Ray cluster under ``TEMP_DIR``.

    python ray_driver.py crash|slow STORE TEMP_DIR FLAG
"""

import os
import sys
import time

mode, store, temp_dir, flag = sys.argv[1:5]


def crash(reader, put, plan, group, device):
    os._exit(1)  # the worker process dies, as if its node were lost


def slow(reader, put, plan, group, device):
    with open(flag, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(600)


import mmer_cl.distributed.ray_expand as ray_expand  # noqa: E402

_init = ray_expand.RayRunner.__init__


def patched(self, address=None, **kw):
    kw["group_fn"] = crash if mode == "crash" else slow
    kw["retries"] = 0
    kw["init_kwargs"] = {"_temp_dir": temp_dir}  # otherwise what `mmer expand --ray` starts
    _init(self, address, **kw)


ray_expand.RayRunner.__init__ = patched
sys.argv = ["mmer", "--store", store, "-q", "expand", "--ray"]
from mmer_cl.cli import main  # noqa: E402

main()
