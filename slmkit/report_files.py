"""What slmkit's self-contained HTML reports share: table markup, style, their output files.

``compare --out`` and ``scaling --out`` write one page each; both check every output path
before anything is computed and write each file atomically, so a refusal or a failure
leaves nothing half written.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from slmkit.errors import SlmkitError
from slmkit.rundir import write_atomic

#: the style sheet of every report page
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td { font-family: ui-monospace, monospace; }
pre { background: #f7f7f7; padding: 0.8em; white-space: pre-wrap; max-width: 60em; }
img { max-width: 100%; }
"""


def html_table(rows: Sequence[Sequence[str]]) -> str:
    """An HTML table of ``rows``: the first is the header; every cell escaped."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def check_output(path: Path) -> None:
    """Refuse, before anything is computed, a file that could not be written."""
    if not path.parent.is_dir():
        raise SlmkitError(f"{path}: no such folder {path.parent}")
    if path.is_dir() or path.name in ("", ".", ".."):
        raise SlmkitError(f"{path}: is a folder; name the file to write")


def write_output(path: Path, data: bytes) -> None:
    """Write one output atomically; a failure is one line naming the file."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise SlmkitError(f"{path}: cannot write: {exc.strerror or exc}") from None
