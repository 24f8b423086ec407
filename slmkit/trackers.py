"""The trackers of a run: opened with its log, fed every event, failures kept apart.

:class:`Trackers` holds the enabled ``[[trackers]]`` of a run. A training run's log
(:class:`slmkit.runlog.RunLog`, rank 0 only) hands it each line it writes: the first
(``run_start``) opens every tracker and feeds it the events the log kept so far, so a
resumed run's trackers catch up on what a killed process never flushed, and each line
after is fed as written. ``slmkit export`` feeds a finished run's kept events the same
way (:meth:`Trackers.replay`). A tracker that raises (its package missing, a full disk, a
server gone) is dropped: a live run says so in one line on stderr and a
``tracker_failed`` event, and goes on; an export fails with that line.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from slmkit.errors import SlmkitError
from slmkit.run_segments import kept_events
from slmkit.runfiles import read_experiment
from slmkit.runlog import read_events
from slmkit.tracking import TrackedRun, Tracker


class EventLog(Protocol):
    """What the trackers of a live run need of its log."""

    path: Path

    def event(self, event: str, /, **fields: Any) -> None:
        """Append an event."""


class TrackerEntry(Protocol):
    """One enabled tracker: its component's name, its plugin, and the tracker (``hook``):
    the :class:`slmkit.hooks.EnabledHook` the kernel makes of every enabled component."""

    name: str
    plugin: str
    hook: Tracker


class TrackerFailed(SlmkitError):
    """A tracker failed while exporting a run."""


def tracked_run(run_dir: Path, start: dict[str, Any]) -> TrackedRun:
    """The run a folder holds, as trackers see it: from its latest ``run_start`` (``{}``:
    none) and its experiment."""
    experiment = read_experiment(run_dir / "experiment.toml", [])
    sweep = start.get("sweep")
    return TrackedRun(
        run_id=str(start.get("run_id") or run_dir.name),
        run_dir=run_dir,
        name=str(start.get("experiment") or experiment.get("experiment", {}).get("name", "")),
        experiment=experiment,
        sweep=sweep if isinstance(sweep, dict) else None,
    )


class Trackers:
    """The enabled trackers of a run (none: every call does nothing)."""

    def __init__(self, entries: Sequence[TrackerEntry] = ()) -> None:
        self.entries = list(entries)
        #: the step of the latest event fed, which a failure names
        self.step = 0
        self.opened = False
        #: (tracker name, where its record is) as each tracker's ``open`` said it
        self.where: list[tuple[str, str]] = []
        #: how a failure is reported (a live run); None: raised as :class:`TrackerFailed`
        self._report: Callable[[TrackerEntry, str], None] | None = None

    def __bool__(self) -> bool:
        return bool(self.entries)

    def feed(self, event: dict[str, Any], log: EventLog) -> None:
        """An event just written to a live run's ``log``; the first opens the trackers."""
        if self.opened:
            self._record(event)
            return
        self.opened = True

        def report(entry: TrackerEntry, message: str) -> None:
            print(f"slmkit: warning: {message}; the run goes on without it", file=sys.stderr)
            log.event("tracker_failed", tracker=entry.name, plugin=entry.plugin,
                      step=self.step, error=message)  # fmt: skip

        self._report = report
        self._open(log.path.parent, kept_events(read_events(log.path)))

    def replay(self, run_dir: Path) -> None:
        """Feed a finished run's kept events from its ``log.jsonl``, then close."""
        self._open(run_dir, kept_events(read_events(run_dir / "log.jsonl")))
        self.close()

    def close(self) -> None:
        """Close every tracker (what each holds pending is written)."""
        for entry in list(self.entries):
            self._guarded(entry, entry.hook.close, closing=True)
        self.entries = []

    def _open(self, run_dir: Path, events: Sequence[dict[str, Any]]) -> None:
        start: dict[str, Any] = next(
            (e for e in reversed(events) if e.get("event") == "run_start"), {}
        )
        run = tracked_run(run_dir, start)
        resumed = start.get("resumed_from_step")
        self.step = resumed if isinstance(resumed, int) else 0
        for entry in list(self.entries):
            where = self._guarded(entry, functools.partial(entry.hook.open, run))
            if isinstance(where, str) and where:
                self.where.append((entry.name, where))
        for event in events:
            self._record(event)

    def _record(self, event: dict[str, Any]) -> None:
        step = event.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            self.step = step
        for entry in list(self.entries):
            self._guarded(entry, functools.partial(entry.hook.record, event))

    def _guarded(
        self, entry: TrackerEntry, call: Callable[[], object], *, closing: bool = False
    ) -> object:
        """``call()``'s result; if it raises, drop the tracker, report it once, None."""
        try:
            return call()
        except (Exception, SystemExit) as exc:  # a tracker's sys.exit() must not end the run
            self.entries.remove(entry)
            text = (str(exc).strip().splitlines() or [""])[0][:300]
            message = (
                f"tracker {entry.name!r} ({entry.plugin}) failed at step {self.step}: "
                f"{type(exc).__name__}: {text}"
            )
            if self._report is None:
                raise TrackerFailed(message) from exc
            self._report(entry, message)
            if not closing:
                with contextlib.suppress(Exception):  # what it holds may still be written
                    entry.hook.close()
            return None
