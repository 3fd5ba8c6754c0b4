"""The ``mmer`` console script: Ctrl-C is handled from the first line, before click, torch or numba load.

A Ctrl-C during start-up (the heavy imports take seconds on a busy machine)
ends the process with exit 130 and one line, like one during a command (see
:mod:`mmer_cl.runtime.interrupts` for the two modes).
Only what precedes this module (the interpreter's own start-up, a few tens of
milliseconds) is left to the system's default, which ends the process by the
signal without output (a shell reports 130 there too).
"""

from mmer_cl.runtime.interrupts import remember_interrupts

remember_interrupts(at_once=True)  # until the store opens, a Ctrl-C ends the process from the handler


def main() -> None:
    try:
        from mmer_cl.cli import main as cli_main
    except BaseException:  # noqa: BLE001 - an import cut short by Ctrl-C; anything else is reported by cli_main
        from mmer_cl.runtime.interrupts import exit_interrupted, was_interrupted

        if not was_interrupted():
            raise
        exit_interrupted()
    cli_main()


if __name__ == "__main__":
    main()
