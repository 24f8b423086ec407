"""Runs as the points a scaling law is fitted to: ``N``, ``D`` and the final loss of each.

``N`` is the run's non-embedding parameters (``run_start.non_embedding_params``), ``D`` the
training tokens it saw (steps x tokens per step) and ``L`` its last validation loss. Only
finished runs with a finite loss are points; the others are left out, each with why.

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
