"""A run's log as the processes that wrote it: one segment per ``run_start``.

A resumed run appends to the log of its folder: the new process logs a ``run_start`` with
``resumed_from_step`` (the step of the checkpoint it continued from), so the log splits
into segments, one per process. Each segment tells how that process ended (its status),
which steps of it the run kept (those up to the next segment's checkpoint), how long they
took, and the environment the process ran in. Reading them needs neither torch nor plugins.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from slmkit.rundir import process_alive

Event = dict[str, Any]
Segment = list[Event]

#: the ``run_start`` fields that describe where and how a run computed: shown by
#: ``slmkit compare`` apart from the experiment's keys (plugin versions are added as
#: ``plugins.<name>``)
ENVIRONMENT_KEYS = (
    "num_threads", "device", "cuda_device", "torch_version", "cuda_version", "cpu_capability",
    "python_version", "platform", "world_size", "backend", "git_commit", "git_dirty",
    "slmkit_version",
)  # fmt: skip


def split_segments(events: Sequence[Event]) -> list[Segment]:
    """The events, cut before each ``run_start`` (anything before the first is one more)."""
    segments: list[Segment] = []
    for event in events:
        if event.get("event") == "run_start" or not segments:
            segments.append([])
        segments[-1].append(event)
    return segments


def kept_events(events: Sequence[Event]) -> list[Event]:
    """The events of the steps the run kept, in order: a resumed run trains the steps after
    its checkpoint again, so what an earlier process logged of them is left out."""
    kept: list[Event] = []
    for event in events:
        resumed = event.get("resumed_from_step") if event.get("event") == "run_start" else None
        if isinstance(resumed, int):
            kept = [e for e in kept if not (isinstance(e.get("step"), int) and e["step"] > resumed)]
        kept.append(event)
    return kept


def started(segment: Segment) -> Event:
    """The segment's ``run_start`` event (empty when the log lost it)."""
    return segment[0] if segment and segment[0].get("event") == "run_start" else {}


def status(segment: Segment) -> tuple[str, str]:
    """Status and a few words of why, from the events of one process."""
    names = {e.get("event") for e in segment}
    if "run_end" in names:
        return "finished", "run_end logged"
    if "run_failed" in names:
        failed = next(e for e in reversed(segment) if e.get("event") == "run_failed")
        return "failed", str(failed.get("error", "run_failed logged"))
    if "run_interrupted" in names:
        stop = next(e for e in reversed(segment) if e.get("event") == "run_interrupted")
        return "stopped", f"{stop.get('signal', 'signal')} at step {stop.get('step')}"
    start = started(segment)
    pid = start.get("pid")
    if isinstance(pid, int) and process_alive(pid):
        return "running", f"process {start['pid']}"
    return "stopped", "the process ended without logging why (killed?)"


def event_time(event: Event | None) -> datetime | None:
    """When ``event`` was logged (its ISO-8601 ``timestamp``); None if it has none."""
    try:
        return datetime.fromisoformat(str((event or {})["timestamp"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None


#: how far back before its latest ``train_step`` a process's recent speed looks, seconds
RECENT_S = 60.0


def recent_steps_per_s(segment: Segment, recent_s: float = RECENT_S) -> float | None:
    """The process's recent speed in steps per second, from its ``train_step`` events: those
    logged in the ``recent_s`` seconds before its latest one (its latest two when fewer), by
    their steps and timestamps. The evaluations, samples and checkpoints in between count,
    since they take the run's time too. ``None`` before two such events."""
    points: list[tuple[datetime, int]] = []
    for event in segment:
        step, when = event.get("step"), event_time(event)
        if event.get("event") == "train_step" and type(step) is int and when is not None:
            points.append((when, step))
    if len(points) < 2:
        return None
    last_time, last_step = points[-1]
    recent = [p for p in points[:-1] if (last_time - p[0]).total_seconds() <= recent_s]
    first_time, first_step = recent[0] if recent else points[-2]
    seconds = (last_time - first_time).total_seconds()
    if seconds <= 0 or last_step <= first_step:
        return None
    return (last_step - first_step) / seconds


def whole_run_tokens_per_s(segments: Sequence[Segment], tokens_per_step: int) -> float | None:
    """Training tokens per second over the steps the run kept, all processes together.

    A process's kept steps run from its ``run_start`` (at ``resumed_from_step``) to the
    ``checkpoint`` event the next process resumed from, or to ``run_end`` for the last one;
    steps trained again after a resume count once, as in the curves. ``None`` when the
    log does not tell (no ``run_end``, a timestamp or checkpoint event missing).
    """
    kept_seconds, first_step, last_step = 0.0, None, None
    for i, segment in enumerate(segments):
        start = started(segment)
        if not start:
            continue
        from_step = int(start.get("resumed_from_step") or 0)
        first_step = from_step if first_step is None else first_step
        if i + 1 < len(segments):
            to_step = int(started(segments[i + 1]).get("resumed_from_step") or 0)
            if to_step <= from_step:
                continue  # nothing of this process was kept
            saved = [e for e in segment if e.get("event") == "checkpoint"]
            end = next((e for e in saved if e.get("step") == to_step), None)
        else:
            end = next((e for e in segment if e.get("event") == "run_end"), None)
            to_step = int((end or {}).get("summary", {}).get("steps", 0))
        begin, finish = event_time(start), event_time(end)
        if begin is None or finish is None:
            return None
        kept_seconds += (finish - begin).total_seconds()
        last_step = to_step
    if first_step is None or last_step is None or kept_seconds <= 0:
        return None
    return round((last_step - first_step) * tokens_per_step / kept_seconds, 1)


def environment_history(segments: Sequence[Segment]) -> dict[str, list[Any]]:
    """Each environment field's values over the run's processes, in order: one value, or
    each change (``num_threads: [2, 1]`` for a run resumed with one thread)."""
    history: dict[str, list[Any]] = {}
    for segment in segments:
        start = started(segment)
        if not start:
            continue
        fields = {key: start[key] for key in ENVIRONMENT_KEYS if key in start}
        plugins = start.get("plugins")
        if isinstance(plugins, dict):
            fields.update({f"plugins.{name}": version for name, version in plugins.items()})
        for key, value in fields.items():
            values = history.setdefault(key, [])
            if not values or values[-1] != value:
                values.append(value)
    return history
