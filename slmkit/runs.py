"""Run folders read back: status, curves and final metrics of each run, from its files.

A run folder holds ``experiment.toml`` (the resolved experiment) and ``log.jsonl`` (one
event a line). Everything here is recomputed from those two files, so it works for runs that
are finished, still training, stopped, or killed, and needs neither torch nor the plugins.

A resumed run appends a new ``run_start`` (with ``resumed_from_step``) to the same log.
Steps the killed process had logged past that checkpoint were trained again, so the curves
drop them and keep the values of the resumed process.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from slmkit.config.diff import config_hash
from slmkit.errors import SlmkitError
from slmkit.run_segments import (
    environment_history,
    split_segments,
    started,
    status,
    whole_run_tokens_per_s,
)
from slmkit.runlog import read_events
from slmkit.table import format_table

#: what a run's ``status`` can be
STATUSES = ("running", "finished", "stopped", "failed")


@attrs.define
class Curve:
    """Loss values by step, in step order."""

    steps: list[int] = attrs.field(factory=list)
    values: list[float] = attrs.field(factory=list)

    @classmethod
    def from_points(cls, points: dict[int, float]) -> Curve:
        """A curve from ``{step: value}``."""
        steps = sorted(points)
        return cls(steps, [points[s] for s in steps])


@attrs.define
class RunRecord:
    """One run folder as ``slmkit runs`` and ``slmkit compare`` see it."""

    run_id: str
    run_dir: Path
    experiment_name: str
    status: str
    status_detail: str
    steps: int
    max_steps: int | None
    last_val_loss: float | None
    last_val_bpc: float | None
    best_val_loss: float | None
    best_val_bpc: float | None
    train_loss: float | None
    tokens_per_s: float | None
    tokens_per_step: int | None
    config_hash: str | None
    git_commit: str | None
    git_dirty: bool | None
    started: str | None
    sweep: dict[str, Any] | None
    experiment: dict[str, Any]
    #: the run_start environment fields, each with its values over the run's processes
    environment: dict[str, list[Any]]
    train_curve: Curve
    val_curve: Curve
    last_sample: str | None
    #: the corpus's floor and the latest excess over it, nats per character (docs/floors.md);
    #: None for a corpus without a floor
    val_floor: float | None = None
    last_val_excess: float | None = None

    @property
    def floor_per_token(self) -> float | None:
        """The floor in the validation loss's unit (nats per token), for drawing it."""
        if self.val_floor is None or self.last_val_excess is None or not self.last_val_loss:
            return None
        per_char = self.last_val_excess + self.val_floor
        return self.val_floor * self.last_val_loss / per_char if per_char > 0 else None

    @property
    def tokens_seen(self) -> int | None:
        """Training tokens consumed so far."""
        return None if self.tokens_per_step is None else self.steps * self.tokens_per_step

    def as_json(self) -> dict[str, Any]:
        """The record for ``slmkit runs --json``: plain values (NaN as null), no curves."""
        return {key: None if isinstance(v, float) and not math.isfinite(v) else v
                for key, v in self._plain().items()}  # fmt: skip

    def _plain(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "experiment": self.experiment_name,
            "status": self.status,
            "status_detail": self.status_detail,
            "steps": self.steps,
            "max_steps": self.max_steps,
            "tokens_seen": self.tokens_seen,
            "train_loss": self.train_loss,
            "last_val_loss": self.last_val_loss,
            "last_val_bpc": self.last_val_bpc,
            "best_val_loss": self.best_val_loss,
            "best_val_bpc": self.best_val_bpc,
            "val_floor": self.val_floor,
            "last_val_excess": self.last_val_excess,
            "tokens_per_s": self.tokens_per_s,
            "config_hash": self.config_hash,
            "git_commit": self.git_commit,
            "git_dirty": self.git_dirty,
            "started": self.started,
            "sweep": self.sweep,
            "environment": self.environment,
        }


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a run folder (it has a log)."""
    return (path / "log.jsonl").is_file()


def _tokens_per_step(experiment: dict[str, Any], start: dict[str, Any]) -> int | None:
    """Training tokens per optimizer step: windows over all ranks x the context length."""
    try:
        t, m = experiment["training"], experiment["model"]
        windows = start.get("global_batch_size") or (
            int(t["batch_size"]) * int(t.get("grad_accum_steps", 1))
        )
        return int(windows) * int(m["context_length"])
    except (KeyError, TypeError, ValueError):
        return None


def _loss(value: Any) -> float:
    """A logged loss; ``null`` (a non-finite value, see ``nonfinite``) reads as NaN."""
    return math.nan if value is None else float(value)


def read_run(run_dir: str | Path) -> RunRecord:
    """Read one run folder; raises :class:`SlmkitError` when it is not one."""
    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise SlmkitError(f"{run_dir}: not a run folder (no log.jsonl)")
    try:
        experiment = tomllib.loads((run_dir / "experiment.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        experiment = {}
    events = read_events(log)
    segments = split_segments(events)

    train: dict[int, float] = {}
    val: dict[int, tuple[float, float | None]] = {}
    excess: dict[int, float] = {}
    floor: float | None = None
    steps = 0
    train_tokens_per_s: float | None = None
    sample: str | None = None
    for event in events:
        name = event.get("event")
        step = event.get("step")
        resumed = event.get("resumed_from_step") if name == "run_start" else None
        if resumed is not None:  # steps past the checkpoint were trained again
            train = {s: v for s, v in train.items() if s <= resumed}
            val = {s: v for s, v in val.items() if s <= resumed}
            excess = {s: v for s, v in excess.items() if s <= resumed}
            steps = min(steps, int(resumed))
        if isinstance(step, int):
            steps = max(steps, step)
        if name == "train_step" and step is not None:
            train[step] = _loss(event.get("train_loss"))
            train_tokens_per_s = event.get("tokens_per_s")
        elif name == "eval" and step is not None:
            val[step] = (_loss(event.get("val_loss")), event.get("val_bpc"))
            if event.get("val_floor") is not None:
                floor, excess[step] = event["val_floor"], _loss(event.get("val_excess"))
        elif name == "sample":
            sample = event.get("sample_text")

    starts = [started(segment) for segment in segments if started(segment)]
    first_start = starts[0] if starts else {}
    segment = segments[-1] if segments else []
    start = started(segment) or first_start
    state, detail = status(segment) if start else ("failed", "no run_start logged")
    end = next((e for e in reversed(segment) if e.get("event") == "run_end"), None)
    summary = end.get("summary", {}) if end else {}
    tokens_per_step = _tokens_per_step(experiment, start)
    if end is None:  # still training, or stopped: the latest logging window's speed
        tokens_per_s = train_tokens_per_s
    elif len(starts) == 1:  # one process: its own measure
        tokens_per_s = summary.get("tokens_per_s")
    else:  # resumed: over every process's kept steps
        tokens_per_s = whole_run_tokens_per_s(segments, tokens_per_step or 0) or None
    last = val[max(val)] if val else None
    finite = [s for s in val if math.isfinite(val[s][0])]
    best_step = min(finite, key=lambda s: val[s][0]) if finite else None
    best = val[best_step] if best_step is not None else None
    return RunRecord(
        run_id=str(start.get("run_id") or run_dir.name),
        run_dir=run_dir,
        experiment_name=str(
            start.get("experiment") or experiment.get("experiment", {}).get("name", "?")
        ),
        status=state,
        status_detail=detail,
        steps=int(summary.get("steps", steps)),
        max_steps=start.get("max_steps", experiment.get("training", {}).get("max_steps")),
        last_val_loss=last[0] if last else None,
        last_val_bpc=last[1] if last else None,
        best_val_loss=best[0] if best else None,
        best_val_bpc=best[1] if best else None,
        train_loss=train[max(train)] if train else None,
        tokens_per_s=tokens_per_s,
        tokens_per_step=tokens_per_step,
        # recomputed from experiment.toml: runs logged before the hash left out
        # training.max_steps match the runs of today
        config_hash=config_hash(experiment) if experiment else start.get("config_hash"),
        git_commit=start.get("git_commit"),
        git_dirty=start.get("git_dirty"),
        started=first_start.get("timestamp"),
        sweep=first_start.get("sweep"),
        experiment=experiment,
        environment=environment_history(segments),
        train_curve=Curve.from_points(train),
        val_curve=Curve.from_points({s: v[0] for s, v in val.items()}),
        last_sample=sample,
        val_floor=floor,
        last_val_excess=excess[max(excess)] if excess else None,
    )


def list_runs(runs_dir: str | Path, *, sweep: str | None = None) -> list[RunRecord]:
    """Every run folder directly under ``runs_dir``, newest first (of one sweep, if given)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise SlmkitError(f"{runs_dir}: no such folder of runs")
    records = [read_run(p) for p in runs_dir.iterdir() if p.is_dir() and is_run_dir(p)]
    if sweep is not None:
        records = [r for r in records if (r.sweep or {}).get("id") == sweep]
    return newest_first(records)


def started_at(record: RunRecord) -> datetime:
    """When the run first started (its first ``run_start``); the distant past if unknown."""
    try:
        when = datetime.fromisoformat((record.started or "").replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def newest_first(records: Sequence[RunRecord]) -> list[RunRecord]:
    """Runs by the time of their first ``run_start``, the newest first.

    Never by folder name: run ids tell the second only, and runs of one second would then
    sort by their random suffix. Runs logged in the same microsecond (never seen) fall
    back to the sweep index (a sweep runs them in that order), then the run id.
    """
    return sorted(
        records,
        key=lambda r: (started_at(r), (r.sweep or {}).get("index", -1), r.run_id),
        reverse=True,
    )


def resolve_run(name: str, runs_dir: str | Path) -> Path:
    """A run given as a folder path or as a run id under ``runs_dir``."""
    path = Path(name)
    for candidate in (path, Path(runs_dir) / name):
        if candidate.is_dir() and is_run_dir(candidate):
            return candidate
    raise SlmkitError(f"{name}: no such run (neither a run folder nor a run id in {runs_dir})")


# -- formatting --------------------------------------------------------------------------


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


#: what :func:`lookup` returns for a key the experiment lacks
MISSING: Any = object()


def lookup(experiment: dict[str, Any], dotted: str, default: Any = MISSING) -> Any:
    """The value of a dotted key in a resolved experiment (list entries by index)."""
    node: Any = experiment
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return default
    return node


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
