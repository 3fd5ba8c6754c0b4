"""``python -m mmer_cl.cli``: the ``mmer`` command, as the console script runs it."""

from mmer_cl.cli.entry import main

main()
