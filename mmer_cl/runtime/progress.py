"""Progress of a store command on stderr: a bar with ETA in a terminal, periodic lines in a log.

In a terminal, click's progress bar (position, percent, ETA). Without one
(CI, a pipeline, ``2> log``) a bar would print nothing useful, so one line
goes out at the start, then at most every ``MMER_PROGRESS_SECONDS`` (default
10) seconds, and at the end: step, percent, elapsed time and an estimate of
what is left. ``--quiet`` silences both. The store calls it as
``progress(step, total, item)`` once per tensor.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

import click

ENV_INTERVAL = "MMER_PROGRESS_SECONDS"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 90 else f"{int(s // 60)} min {int(s % 60):02d} s"


class Progress:
    """A progress report for one labelled operation; created on first use; silent when ``quiet``."""

    def __init__(self, label: str, quiet: bool, stream: TextIO | None = None, interval: float | None = None):
        self.label, self.quiet = label, quiet
        self.stream = stream if stream is not None else sys.stderr
        if interval is None:
            try:
                interval = float(os.environ.get(ENV_INTERVAL, "10"))
            except ValueError:
                interval = 10.0
        self.interval = interval
        self.bar = None
        self.done = self.total = 0
        self.started = self.last_line = None

    def _is_terminal(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def __call__(self, step: int, total: int, item: str = "") -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self.started is None:
            self.started = now
            if self._is_terminal():
                self.bar = click.progressbar(length=total, label=self.label, file=self.stream, show_pos=True,
                                             show_percent=True, show_eta=True)
                self.bar.__enter__()
            else:
                self._line(f"{self.label}: 0/{total} (0%), started")
                self.last_line = now
        self.total = total
        if self.bar is not None:
            self.bar.update(step - self.done)
        elif now - self.last_line >= self.interval and step < total:
            self._line(self._status(step, total, now))
            self.last_line = now
        self.done = step

    def _status(self, step: int, total: int, now: float) -> str:
        elapsed = now - self.started
        percent = 100 * step / total if total else 100
        left = f", about {_seconds(elapsed * (total - step) / step)} left" if step else ""
        return f"{self.label}: {step}/{total} ({percent:.0f}%), {_seconds(elapsed)} elapsed{left}"

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
        elif self.started is not None and exc_type is None and not self.quiet:
            percent = 100 * self.done / self.total if self.total else 100
            self._line(f"{self.label}: {self.done}/{self.total} ({percent:.0f}%), done in "
                       f"{_seconds(time.monotonic() - self.started)}")
