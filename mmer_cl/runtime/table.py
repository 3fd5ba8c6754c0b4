"""Tables and byte sizes for every CLI listing.

Tables are rendered by rich (no borders, no colour, columns as wide as their
widest cell, two spaces between columns), as plain text, so a long name
widens its column instead of running into the next one and the output is
the same in a terminal, a pipe and a test. A column whose cells are numbers
(or given as ``Right``) is right-aligned.
"""

from __future__ import annotations

import io
from typing import Iterable, Sequence


def human_bytes(n: float) -> str:
    """Bytes in binary units (KiB, MiB, ...), as `du -h` and the README count them.

    Hand-written because rich's ``filesize`` offers only decimal units (kB, MB), which would not match `du`.
    """
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
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    rows = [list(r) for r in rows]
    table = Table(box=None, padding=(0, gap // 2, 0, gap - gap // 2), pad_edge=False, show_edge=False,
                  header_style=None)
    justify = []
    for i, header in enumerate(headers):
        column = [r[i] for r in rows if r[i] is not None]
        justify.append("right" if column and all(_is_right(c) for c in column) else "left")
        table.add_column(Text(header), justify=justify[i], no_wrap=True)
    for r in rows:  # Text cells: never read as rich markup or emoji codes
        table.add_row(*(Text(str(c) if c is not None else "-", justify=j) for c, j in zip(r, justify)))
    out = io.StringIO()
    Console(file=out, width=1_000_000, color_system=None, force_terminal=False, highlight=False, markup=False,
            emoji=False, soft_wrap=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())
