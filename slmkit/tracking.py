"""Experiment trackers: what a tracker is, and what it records of a run's events.

A tracker (a plugin component, enabled by a ``[[trackers]]`` table) mirrors a run into a
tool such as TensorBoard or trackio. It is fed the run's log events, the very dicts
``log.jsonl`` holds (a line read back), whether the run is training (rank 0, as each event
is written) or finished (``slmkit export`` reads its log), so both give the same record.
:func:`tracked_values` turns one event into the values every tracker records the same
way: scalars, histograms and texts under tags such as ``train/loss``. Reading needs
neither torch nor the tracker's own package.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs

from slmkit.config.diff import flatten
from slmkit.run_segments import event_time

#: a hyperparameter as trackers' hparams views take it
HParam = bool | int | float | str

#: fields of an event that say what it is, not what was measured
_NOT_MEASURED = frozenset(
    {"event", "run_id", "timestamp", "step", "nonfinite", "name", "phase", "probe", "plugin"}
)
#: the kernel's own events: their tag prefix, and the field prefix the tag leaves out
_KERNEL_PREFIXES = {"train_step": ("train", "train_"), "eval": ("val", "val_")}
#: what ``run_end``'s summary holds that trackers record as the run's final metrics
FINAL_METRICS = ("train_loss", "val_loss", "best_val_loss", "val_bpc")


@attrs.define(frozen=True)
class TrackedRun:
    """The run a tracker records: what :meth:`Tracker.open` receives."""

    #: the run's id (its folder's name): a tracker's run name
    run_id: str
    #: the run folder (relative to the working directory when ``runs_dir`` is)
    run_dir: Path
    #: ``[experiment] name``: a tracker's project, say
    name: str
    #: the resolved experiment, as the run folder's ``experiment.toml`` holds it
    experiment: dict[str, Any] = attrs.field(factory=dict)
    #: ``{"id", "index", "size", "overrides"}`` when the run is a member of a sweep
    sweep: dict[str, Any] | None = None

    @property
    def hparams(self) -> dict[str, HParam]:
        """The experiment as dotted keys and plain values (lists as JSON text), sorted."""
        flat = flatten(self.experiment)
        return {
            key: value if isinstance(value, HParam) else json.dumps(value)
            for key, value in sorted(flat.items())
            if value is not None
        }


@attrs.define(frozen=True)
class TrackedValues:
    """What a tracker records of one event, at one step; tags are ``/``-separated paths."""

    step: int
    scalars: dict[str, float] = attrs.field(factory=dict)
    #: a list of numbers an event carried (per layer, per head...): its values
    histograms: dict[str, list[float]] = attrs.field(factory=dict)
    #: Markdown (a sample is an indented code block, shown as written)
    texts: dict[str, str] = attrs.field(factory=dict)
    #: ``run_end``: the scalars are the run's final metrics (``final/...``), what an
    #: hparams view compares runs by
    final: bool = False
    #: when the event was logged, in seconds since the epoch (None if the log lacks it)
    time: float | None = None

    @property
    def tags(self) -> list[str]:
        """Every tag, scalars first."""
        return [*self.scalars, *self.histograms, *self.texts]

    def unrecorded(self, held: Mapping[str, int]) -> TrackedValues:
        """Only the values whose tag ``held`` (tag: the last step a store holds) lacks at
        this step: a resumed or exported run then records each step once."""

        def new(tag: str) -> bool:
            return held.get(tag, -1) < self.step

        return attrs.evolve(
            self,
            scalars={t: v for t, v in self.scalars.items() if new(t)},
            histograms={t: v for t, v in self.histograms.items() if new(t)},
            texts={t: v for t, v in self.texts.items() if new(t)},
        )


class Tracker(Protocol):
    """Mirrors a run into an experiment tracker; built by ``factory(options)``.

    ``open(run)`` starts recording :class:`TrackedRun` ``run`` (import the tracker's
    package here, not at the plugin's import, so a missing one fails only this tracker) and
    may return where the record is, which the run's start says (a folder, an address, the
    command that shows it);
    ``record(event)`` takes each log event in order (:func:`tracked_values` gives what to
    record); ``close()`` flushes and ends. A resumed run feeds the events its log kept
    again, and ``slmkit export`` feeds a finished run's into a store that may hold them
    already: record only values the store lacks (:meth:`TrackedValues.unrecorded`). An
    exception from any method drops the tracker, reported once; the run goes on.
    """

    def open(self, run: TrackedRun) -> str | None:
        """Start recording ``run`` (a new record, or the one a resumed run continues);
        return where the record is, for the console (None: nothing to say)."""

    def record(self, event: dict[str, Any]) -> None:
        """Record one log event (a dict as ``log.jsonl`` holds it)."""

    def close(self) -> None:
        """Write what is pending and end the record."""


class TrackerFactory(Protocol):
    """``factory(options)`` -> a :class:`Tracker`."""

    def __call__(self, options: Any, /) -> Tracker: ...


def tracked_values(event: Mapping[str, Any]) -> TrackedValues | None:
    """What trackers record of a log event; None when it measured nothing.

    Numbers become scalars, lists of numbers histograms, at the event's ``step``:
    ``train_step`` as ``train/loss``, ``train/lr``, ``train/tokens_per_s``; ``eval`` as
    ``val/loss``, ``val/bpc`` (``val/floor``, ``val/excess``); events with ``metrics``
    under their event, name (or probe) and phase: ``probe/induction/score``,
    ``forward_hook/activation_stats/train/blocks.0.hook_resid_post/mean``; any other
    event's numeric fields as ``<event>/<field>``. A ``sample`` is the text ``sample``;
    ``run_end`` gives the final metrics, ``final/val_loss``... at its last step. A value
    logged as ``null`` for being NaN or infinite is recorded as that float again.
    """
    fields = _restored(dict(event))
    logged = event_time(fields)
    name, time = str(fields.get("event")), None if logged is None else logged.timestamp()
    if name == "run_end":
        return _final(fields.get("summary"), time)
    step = fields.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    if name == "sample":
        text = f"{fields.get('prompt') or ''}{fields.get('sample_text') or ''}"
        return TrackedValues(step, texts={"sample": _code_block(text)}, time=time)
    values = TrackedValues(step, time=time)
    if isinstance(fields.get("metrics"), Mapping):
        labels = [fields.get(k) for k in ("name", "probe", "phase")]
        prefix = "/".join([name, *(str(label) for label in labels if isinstance(label, str))])
        _collect(values, prefix, fields["metrics"])
    else:
        prefix, strip = _KERNEL_PREFIXES.get(name, (name, ""))
        for key, value in fields.items():
            if key not in _NOT_MEASURED:
                tag = key.removeprefix(strip) if strip else key
                _collect(values, f"{prefix}/{tag}", value)
    return values if values.tags else None


def _final(summary: Any, time: float | None) -> TrackedValues | None:
    if not isinstance(summary, Mapping) or not isinstance(summary.get("steps"), int):
        return None
    scalars = {
        f"final/{key}": float(summary[key])
        for key in FINAL_METRICS
        if isinstance(summary.get(key), int | float) and not isinstance(summary[key], bool)
    }
    return TrackedValues(summary["steps"], scalars=scalars, final=True, time=time)


def _collect(values: TrackedValues, tag: str, value: Any) -> None:
    """Put ``value`` under ``tag``: numbers as scalars, lists of numbers as a histogram,
    tables path by path; strings, booleans and nulls are not measurements."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        values.scalars[tag] = float(value)
    elif isinstance(value, Mapping):
        for key, inner in value.items():
            _collect(values, f"{tag}/{key}", inner)
    elif isinstance(value, list):
        numbers = [v for v in _numbers(value) or [] if math.isfinite(v)]  # what bins hold
        if numbers:
            values.histograms[tag] = numbers


def _numbers(value: list[Any]) -> list[float] | None:
    """The numbers of a (nested) list; None when it holds anything else."""
    out: list[float] = []
    for item in value:
        if isinstance(item, list):
            inner = _numbers(item)
            if inner is None:
                return None
            out += inner
        elif isinstance(item, int | float) and not isinstance(item, bool):
            out.append(float(item))
        else:
            return None
    return out


def _restored(fields: dict[str, Any]) -> dict[str, Any]:
    """The event with each value ``nonfinite`` names (logged as null) a float again."""
    nonfinite = fields.get("nonfinite")
    if not isinstance(nonfinite, Mapping):
        return fields

    def restore(value: Any, path: str) -> Any:  # paths as slmkit.runlog.finite_fields makes them
        if value is None and path in nonfinite:
            return float(str(nonfinite[path]))  # "nan", "inf", "-inf"
        if isinstance(value, dict):
            return {k: restore(v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v, f"{path}.{i}") for i, v in enumerate(value)]
        return value

    return {key: restore(value, key) for key, value in fields.items()}


def _code_block(text: str) -> str:
    """``text`` as a Markdown code block (indented), so it shows as written."""
    return "\n".join("    " + line for line in text.split("\n"))
