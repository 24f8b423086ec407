"""The runs table: how ``slmkit runs`` and ``slmkit compare`` show run records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from slmkit.runs import MISSING, RunRecord, lookup
from slmkit.table import format_table


def format_loss(value: float | None) -> str:
    """A loss to 4 decimals; ``-`` when there is none."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def format_started(timestamp: str | None) -> str:
    """An ISO-8601 UTC timestamp as ``YYYY-MM-DD HH:MM``."""
    if not timestamp:
        return "-"
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return timestamp


def format_commit(record: RunRecord) -> str:
    """The short commit, with ``+`` when the tree had local changes."""
    if not record.git_commit:
        return "-"
    return record.git_commit[:8] + ("+" if record.git_dirty else "")


def columns(r: RunRecord) -> dict[str, str]:
    """Every column a table of runs can show, formatted, by header."""
    return {
        "RUN_ID": r.run_id,
        "EXPERIMENT": r.experiment_name,
        "STATUS": r.status,
        "STEPS": f"{r.steps}/{r.max_steps}" if r.max_steps else str(r.steps),
        "TOKENS": "-" if r.tokens_seen is None else f"{r.tokens_seen:,}",
        "TRAIN_LOSS": format_loss(r.train_loss),
        "VAL_LOSS": format_loss(r.last_val_loss),
        "BEST_VAL": format_loss(r.best_val_loss),
        "BPC": format_loss(r.last_val_bpc),
        "FLOOR": format_loss(r.val_floor),
        "EXCESS": "-" if r.last_val_excess is None else f"{r.last_val_excess:+.4f}",
        "TOK/S": "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}",
        "CONFIG": (r.config_hash or "-")[:12],
        "COMMIT": format_commit(r),
        "STARTED (UTC)": format_started(r.started),
    }


#: the columns of ``slmkit runs``
RUNS_COLUMNS = ("RUN_ID", "EXPERIMENT", "STATUS", "STEPS", "VAL_LOSS", "BEST_VAL", "BPC",
                "TOK/S", "CONFIG", "COMMIT", "STARTED (UTC)")  # fmt: skip


def table_rows(
    records: Sequence[RunRecord], headers: Sequence[str], extra_keys: Sequence[str] = ()
) -> list[list[str]]:
    """A header row, then a row per run: the named columns and the dotted keys' values."""
    rows = [[*headers, *extra_keys]]
    for r in records:
        cells = columns(r)
        rows.append([*(cells[h] for h in headers),
                     *(format_value(lookup(r.experiment, key)) for key in extra_keys)])  # fmt: skip
    return rows


def with_floor_columns(records: Sequence[RunRecord], headers: Sequence[str]) -> list[str]:
    """``headers`` with FLOOR and EXCESS after BPC when any run's corpus has a floor."""
    if all(r.val_floor is None for r in records):
        return list(headers)
    at = headers.index("BPC") + 1
    return [*headers[:at], "FLOOR", "EXCESS", *headers[at:]]


def runs_table(records: Sequence[RunRecord], extra_keys: Sequence[str] = ()) -> str:
    """The ``slmkit runs`` table; ``extra_keys`` adds a column per dotted experiment key."""
    return format_table(table_rows(records, with_floor_columns(records, RUNS_COLUMNS), extra_keys))


def format_value(value: Any) -> str:
    """A config value as it would read in TOML; ``(absent)`` for a key a run lacks."""
    if value is MISSING:
        return "(absent)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)
