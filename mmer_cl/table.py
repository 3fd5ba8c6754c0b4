"""One plain-text table renderer for every CLI listing: columns as wide as their widest cell.

No terminal library: a long name widens its column instead of running into
the next one. Numbers (and cells given as ``Right``) are right-aligned.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class Right(str):
    """A cell to right-align (numbers are right-aligned without it)."""


def _is_right(cell) -> bool:
    return isinstance(cell, (int, float, Right)) and not isinstance(cell, bool)


def render_table(headers: Sequence[str], rows: Iterable[Sequence], gap: int = 2) -> str:
    """The table as text: a header line, then one line per row; trailing blanks trimmed."""
    rows = [list(r) for r in rows]
    cells = [[str(c) if c is not None else "-" for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    sep = " " * gap

    def line(values: Sequence[str], raw: Sequence | None) -> str:
        parts = []
        for i, v in enumerate(values):
            right = raw is not None and _is_right(raw[i])
            parts.append(v.rjust(widths[i]) if right else v.ljust(widths[i]))
        return sep.join(parts).rstrip()

    out = [line(list(headers), None)]
    out += [line(c, r) for c, r in zip(cells, rows)]
    return "\n".join(out)
