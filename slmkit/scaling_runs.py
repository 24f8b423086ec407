"""Runs as a scaling study: the points a law is fitted to, the checks, the fit.

``N`` is the run's non-embedding parameters (``run_start.non_embedding_params``), ``D`` the
training tokens it saw (steps x tokens per step) and ``L`` its last validation loss. Only
finished runs with a finite loss are points; the others are left out, each with why.

:func:`fit_runs` fits the law the points call for, with a held-out run kept out of the fit
to be predicted, into a :class:`Study`.

A fit compares losses, so the runs must measure them alike: on one corpus (the same
``data`` keys and the same text, by its sha256), one tokenizer (the same ``tokenizer``
keys) and one validation set (the same context length, validation batches of the same
size and count, over as many ranks). Runs that differ in any of these are refused, naming
the key and which run has which value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs

from slmkit.config.diff import flatten
from slmkit.errors import SlmkitError
from slmkit.run_segments import split_segments, started
from slmkit.runfiles import as_int, read_log
from slmkit.runs import MISSING, RunRecord, lookup
from slmkit.runs_table import format_value
from slmkit.scaling import LAW_N, LAW_ND, Estimate, Fit, Points, fit_law

#: the experiment keys that decide the validation set, beside every data and tokenizer key
VALIDATION_KEYS = ("model.context_length", "training.batch_size", "training.eval_batches")


@attrs.define(frozen=True)
class RunPoint:
    """One finished run as a point of the fit."""

    run_id: str
    #: non-embedding parameters
    n: int
    #: training tokens seen
    d: int
    #: the final validation loss, nats per token
    loss: float
    #: the run's ``training.max_flops`` (0: its length was given in steps)
    max_flops: float


@attrs.define(frozen=True)
class LeftOut:
    """A run that is no point of the fit, and why."""

    run_id: str
    why: str


def run_start(record: RunRecord) -> dict[str, Any]:
    """The first ``run_start`` event of the run's log (empty when there is none)."""
    segments = split_segments(read_log(record.run_dir / "log.jsonl", []))
    return next((started(s) for s in segments if started(s)), {})


def measured_alike(records: Sequence[RunRecord]) -> dict[str, dict[str, Any]]:
    """For each run, the values that must agree: data, tokenizer, validation set."""
    values = {}
    for record in records:
        flat = flatten(record.experiment)
        keys = [k for k in flat if k.startswith(("data.", "tokenizer."))] + list(VALIDATION_KEYS)
        start = run_start(record)
        corpus = start.get("corpus")
        values[record.run_id] = {
            **{key: lookup(record.experiment, key) for key in keys},
            "run_start.corpus.sha256": (corpus or {}).get("sha256", MISSING)
            if isinstance(corpus, dict) else MISSING,
            "run_start.world_size": start.get("world_size", 1),
        }  # fmt: skip
    return values


def check_measured_alike(records: Sequence[RunRecord]) -> None:
    """Refuse runs of different corpora, tokenizers or validation sets, in one line."""
    values = measured_alike(records)
    keys = sorted({key for v in values.values() for key in v})
    for key in keys:
        by_value: dict[str, list[str]] = {}
        for run_id, v in values.items():
            by_value.setdefault(format_value(v.get(key, MISSING)), []).append(run_id)
        if len(by_value) > 1:
            which = "; ".join(f"{value} in {', '.join(ids)}" for value, ids in by_value.items())
            raise SlmkitError(
                f"scaling: the runs differ in {key} ({which}): a fit compares losses only "
                "of runs with one corpus, tokenizer and validation set"
            )


def as_point(record: RunRecord) -> RunPoint | LeftOut:
    """The run as a point, or why it is left out of the fit.

    A finished run whose log has no ``non_embedding_params`` (started by an slmkit before
    it was logged) is refused: ``N`` cannot be known without rebuilding its model.
    """
    if record.status != "finished":
        detail = f": {record.status_detail}" if record.status in ("failed", "damaged") else ""
        return LeftOut(record.run_id, f"{record.status}{detail}")
    loss, tokens = record.last_val_loss, record.tokens_seen
    if loss is None or not math.isfinite(loss) or loss <= 0:
        return LeftOut(record.run_id, "no finite final validation loss")
    if not tokens:
        return LeftOut(record.run_id, "no tokens seen")
    n = as_int(run_start(record).get("non_embedding_params"))
    if n is None or n <= 0:
        raise SlmkitError(
            f"scaling: {record.run_dir}: log.jsonl has no run_start.non_embedding_params "
            "(the run was started by an older slmkit); train it again to fit it"
        )
    flops = lookup(record.experiment, "training.max_flops", 0)
    return RunPoint(record.run_id, n, tokens, loss, float(flops) if flops else 0.0)


def points_of(records: Sequence[RunRecord]) -> tuple[list[RunPoint], list[LeftOut]]:
    """The finished runs as points, and the others with why they are left out."""
    points: list[RunPoint] = []
    left_out: list[LeftOut] = []
    for record in records:
        point = as_point(record)
        if isinstance(point, RunPoint):
            points.append(point)
        else:
            left_out.append(point)
    return points, left_out


# -- the fit of runs ----------------------------------------------------------------------


@attrs.define(frozen=True)
class Study:
    """A fitted law with the runs behind it: what the command prints, draws and writes."""

    fit: Fit
    points: list[RunPoint]
    left_out: list[LeftOut]
    held_out: RunPoint | None
    #: the FLOP budget of the compute-optimal allocation (``L(N, D)`` only)
    budget: float | None

    def prediction(self) -> Estimate | None:
        """The held-out run's predicted loss, with its interval."""
        h = self.held_out
        return None if h is None else self.fit.predict_with_interval(h.n, h.d)

    def allocation(self) -> dict[str, Estimate] | None:
        """The compute-optimal ``N``, ``D`` and loss at :attr:`budget`."""
        return None if self.budget is None else self.fit.allocation(self.budget)


def fit_runs(
    records: Sequence[RunRecord],
    *,
    leave_out: RunRecord | None = None,
    budget: float | None = None,
    resamples: int = 200,
    seed: int = 0,
) -> Study:
    """Fit the law the runs call for; ``leave_out`` is kept out of the fit and predicted.

    Raises :class:`SlmkitError` (one line) when the runs differ in corpus, tokenizer or
    validation set, the held-out run cannot be predicted, the points are too few or the
    fit does not converge.
    """
    held_dir = None if leave_out is None else leave_out.run_dir.resolve()
    others = [r for r in records if r.run_dir.resolve() != held_dir]
    points, left_out = points_of(others)
    held: RunPoint | None = None
    if leave_out is not None:
        point = as_point(leave_out)
        if isinstance(point, LeftOut):
            raise SlmkitError(f"--leave-out {leave_out.run_id}: {point.why}; nothing to predict")
        held = point
    fitted = {p.run_id for p in points} | ({held.run_id} if held else set())
    check_measured_alike([r for r in [*others, *([leave_out] if leave_out else [])]
                          if r.run_id in fitted])  # fmt: skip
    if not points:
        raise SlmkitError("scaling: no finished run to fit" + _left_out_note(left_out))
    tokens = {p.d for p in points}
    law = LAW_ND if len(tokens) > 1 else LAW_N
    if held is not None and law is LAW_N and held.d not in tokens:
        raise SlmkitError(
            f"--leave-out {held.run_id}: it saw D = {held.d:,} tokens, the fitted runs "
            f"D = {next(iter(tokens)):,}; L(N) holds at their D only"
        )
    data = Points.of([p.n for p in points], [p.d for p in points], [p.loss for p in points])
    try:
        fit = fit_law(law, data, resamples=resamples, seed=seed)
    except SlmkitError as exc:
        raise SlmkitError(f"scaling: {exc}{_left_out_note(left_out)}") from None
    if law is LAW_ND and budget is None:  # the largest budget a fitted run spent
        budget = max(6.0 * p.n * p.d for p in points)
    return Study(fit, points, left_out, held, budget if law is LAW_ND else None)


def _left_out_note(left_out: Sequence[LeftOut]) -> str:
    if not left_out:
        return ""
    return f" ({len(left_out)} run(s) left out: {left_out_text(left_out)})"


def left_out_text(left_out: Sequence[LeftOut]) -> str:
    """``id (why), id (why)``."""
    return ", ".join(f"{r.run_id} ({r.why})" for r in left_out)
