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
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from slmkit.config.diff import config_hash
from slmkit.errors import SlmkitError
from slmkit.probe_curves import ProbeMetric, probe_metrics
from slmkit.run_segments import (
    environment_history,
    recent_steps_per_s,
    split_segments,
    started,
    status,
    whole_run_tokens_per_s,
)
from slmkit.runfiles import as_int, as_number, as_table, as_text, read_experiment, read_log

#: what a run's ``status`` can be
STATUSES = ("running", "finished", "stopped", "failed", "damaged")


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
    #: the sha256 of the corpus text the run trained on (``run_start``'s ``corpus``)
    corpus_sha256: str | None = None
    #: the metrics the run's probes logged at its evaluations (docs/probes.md)
    probes: list[ProbeMetric] = attrs.field(factory=list)
    #: the latest process's recent steps per second, from its log (the ETA of ``runs --watch``)
    steps_per_s: float | None = None

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
    try:
        return (path / "log.jsonl").is_file()
    except OSError:  # a folder we may not look into is no run folder of ours
        return False


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
    """Read one run folder; raises :class:`SlmkitError` when it is not one.

    A damaged folder (unreadable or malformed ``experiment.toml``, lines of ``log.jsonl``
    that are not events, values of the wrong type) is still read: what can be read is
    kept, and the record's status is ``damaged``, with the problems as its detail.
    """
    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl"
    if not is_run_dir(run_dir):
        raise SlmkitError(f"{run_dir}: not a run folder (no log.jsonl)")
    problems: list[str] = []
    experiment = read_experiment(run_dir / "experiment.toml", problems)
    events = read_log(log, problems)
    try:
        record = _record(run_dir, experiment, events, problems)
    except Exception as exc:  # a shape of damage the checks above did not foresee
        problems.append(f"unreadable: {type(exc).__name__}: {exc}")
        record = _record(run_dir, {}, [], [])
    if problems:
        record.status, record.status_detail = "damaged", "; ".join(problems)[:300]
    return record


def _record(
    run_dir: Path, experiment: dict[str, Any], events: list[dict[str, Any]], problems: list[str]
) -> RunRecord:
    """The record of a run from its experiment and events; wrong types become problems."""
    train: dict[int, float] = {}
    val: dict[int, tuple[float, float | None]] = {}
    excess: dict[int, float] = {}
    floor: float | None = None
    steps = 0
    train_tokens_per_s: float | None = None
    sample: str | None = None
    malformed: set[str] = set()
    for event in events:
        name = event["event"]
        step = as_int(event.get("step"))
        resumed = as_int(event.get("resumed_from_step")) if name == "run_start" else None
        if resumed is not None:  # steps past the checkpoint were trained again
            train = {s: v for s, v in train.items() if s <= resumed}
            val = {s: v for s, v in val.items() if s <= resumed}
            excess = {s: v for s, v in excess.items() if s <= resumed}
            steps = min(steps, resumed)
        if step is not None:
            steps = max(steps, step)
        if name in ("train_step", "eval"):
            key = "train_loss" if name == "train_step" else "val_loss"
            loss = event.get(key)  # null: a non-finite value (see `nonfinite`)
            if step is None or not (loss is None or as_number(loss) is not None):
                malformed.add(name)
            elif name == "train_step":
                train[step] = _loss(loss)
                train_tokens_per_s = as_number(event.get("tokens_per_s"))
            else:
                val[step] = (_loss(loss), as_number(event.get("val_bpc")))
                if as_number(event.get("val_floor")) is not None:
                    floor = as_number(event.get("val_floor"))
                    excess[step] = _loss(as_number(event.get("val_excess")))
        elif name == "sample":
            sample = as_text(event.get("sample_text"))
    if malformed:
        problems.append("log.jsonl: malformed " + ", ".join(sorted(malformed)) + " event(s)")

    segments = split_segments(events)
    starts = [started(segment) for segment in segments if started(segment)]
    first_start = starts[0] if starts else {}
    segment = segments[-1] if segments else []
    start = started(segment) or first_start
    state, detail = status(segment) if start else ("failed", "no run_start logged")
    end = next((e for e in reversed(segment) if e["event"] == "run_end"), None)
    summary = as_table(end.get("summary")) if end else {}
    tokens_per_step = _tokens_per_step(experiment, start)
    if end is None:  # still training, or stopped: the latest logging window's speed
        tokens_per_s = train_tokens_per_s
    elif len(starts) == 1:  # one process: its own measure
        tokens_per_s = as_number(summary.get("tokens_per_s")) or train_tokens_per_s
    else:  # resumed: over every process's kept steps
        tokens_per_s = whole_run_tokens_per_s(segments, tokens_per_step or 0) or None
    last = val[max(val)] if val else None
    finite = [s for s in val if math.isfinite(val[s][0])]
    best_step = min(finite, key=lambda s: val[s][0]) if finite else None
    best = val[best_step] if best_step is not None else None
    max_steps = as_int(start.get("max_steps"))
    if max_steps is None:
        max_steps = as_int(lookup(experiment, "training.max_steps", None))
    sweep = first_start.get("sweep")
    return RunRecord(
        run_id=as_text(start.get("run_id")) or run_dir.name,
        run_dir=run_dir,
        experiment_name=as_text(start.get("experiment"))
        or as_text(lookup(experiment, "experiment.name", None))
        or "?",
        status=state,
        status_detail=detail,
        steps=steps if as_int(summary.get("steps")) is None else summary["steps"],
        max_steps=max_steps,
        last_val_loss=last[0] if last else None,
        last_val_bpc=last[1] if last else None,
        best_val_loss=best[0] if best else None,
        best_val_bpc=best[1] if best else None,
        train_loss=train[max(train)] if train else None,
        tokens_per_s=tokens_per_s,
        tokens_per_step=tokens_per_step,
        # recomputed from experiment.toml: runs logged before the hash left out
        # training.max_steps match the runs of today
        config_hash=config_hash(experiment) if experiment else as_text(start.get("config_hash")),
        git_commit=as_text(start.get("git_commit")),
        git_dirty=start.get("git_dirty") if isinstance(start.get("git_dirty"), bool) else None,
        started=as_text(first_start.get("timestamp")),
        sweep=sweep if isinstance(sweep, dict) else None,
        experiment=experiment,
        environment=environment_history(segments),
        train_curve=Curve.from_points(train),
        val_curve=Curve.from_points({s: v[0] for s, v in val.items()}),
        last_sample=sample,
        val_floor=floor,
        last_val_excess=excess[max(excess)] if excess else None,
        corpus_sha256=as_text(as_table(first_start.get("corpus")).get("sha256")),
        probes=probe_metrics(events, problems),
        steps_per_s=recent_steps_per_s(segment),
    )


def list_runs(runs_dir: str | Path, *, sweep: str | None = None) -> list[RunRecord]:
    """Every run folder directly under ``runs_dir``, newest first (of one sweep, if given)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise SlmkitError(f"{runs_dir}: no such folder of runs")
    try:
        folders = [p for p in runs_dir.iterdir() if p.is_dir() and is_run_dir(p)]
    except OSError as exc:
        raise SlmkitError(f"{runs_dir}: cannot list the folder: {exc.strerror or exc}") from None
    records = [read_run(p) for p in folders]
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


def gather_runs(
    names: Sequence[str], sweeps: Sequence[str], runs_dir: str, nothing: str
) -> list[RunRecord]:
    """The named runs, then every run of each sweep (in sweep order), a run named twice
    once; ``nothing`` is the error when that makes none."""
    records = [read_run(resolve_run(name, runs_dir)) for name in names]
    for sweep in sweeps:
        swept = list_runs(runs_dir, sweep=sweep)
        if not swept:
            raise SlmkitError(f"--sweep {sweep}: no runs of that sweep in {runs_dir}")
        records += sorted(swept, key=lambda r: (r.sweep or {}).get("index", 0))
    if not records:
        raise SlmkitError(nothing)
    return list({r.run_dir.resolve(): r for r in records}.values())


# -- formatting --------------------------------------------------------------------------


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
