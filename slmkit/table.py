"""Plain-text tables for the command line: left-aligned columns, two spaces apart."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[Sequence[str]], *, wrap_last: bool = False) -> str:
    """Rows (the first is the header) as aligned text lines, ending in a newline.

    With ``wrap_last`` the last column is not padded, so a long last cell (a list of hooks,
    a sample) does not widen every other line.
    """
    if not rows:
        return ""
    n_cols = max(len(row) for row in rows)
    padded = [[*row, *[""] * (n_cols - len(row))] for row in rows]
    aligned = n_cols - 1 if wrap_last else n_cols
    widths = [max(len(row[i]) for row in padded) for i in range(aligned)]
    lines = []
    for row in padded:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        cells += row[aligned:]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"
