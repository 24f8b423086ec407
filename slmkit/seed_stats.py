"""Statistics over seeds: each group's mean, spread and interval, and each group against a
baseline group (Welch's t-test, Holm's correction), for ``slmkit compare``.

Every distribution and test is scipy's (``scipy.stats``), imported only when a group has
two runs or more; the one procedure written here is Holm's correction, which scipy lacks.
See docs/comparing-runs.md for how to read what this computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs

from slmkit.errors import SlmkitError
from slmkit.runs import MISSING, Curve, RunRecord
from slmkit.seed_groups import Group, check_same_validation_set, group_runs, left_out, pick_baseline

#: the confidence of every interval, and the significance level of every test
CONFIDENCE = 0.95
SIGNIFICANCE = 0.05

#: the metrics compared: the name shown (as in the run_end summary) -> the record's field
METRICS = {"val_loss": "last_val_loss", "best_val_loss": "best_val_loss", "val_bpc": "last_val_bpc"}


@attrs.define(frozen=True)
class Estimate:
    """One metric of one group: its values, mean, sample std and t-interval of the mean.

    ``std``, ``low`` and ``high`` are None for a group of one run: one value says nothing
    of the spread, and an interval of zero width would claim it did.
    """

    values: list[float]
    mean: float
    std: float | None = None
    low: float | None = None
    high: float | None = None

    @property
    def n(self) -> int:
        """How many runs the estimate is from."""
        return len(self.values)


def estimate(values: Sequence[float]) -> Estimate:
    """Mean, sample standard deviation (ddof=1) and the t-interval of the mean."""
    import numpy as np

    mean = float(np.mean(values))
    if len(values) < 2:
        return Estimate(list(values), mean)
    low, high = t_interval(np.array([mean]), np.array([list(values)]).T)
    return Estimate(list(values), mean, float(np.std(values, ddof=1)), low[0], high[0])


def t_interval(means: Any, samples: Any) -> tuple[list[float], list[float]]:
    """The t-interval (:data:`CONFIDENCE`) of each column's mean; ``samples`` is runs x
    columns. A column whose values are all equal has the interval [mean, mean]."""
    import numpy as np
    from scipy import stats

    sem = np.atleast_1d(stats.sem(samples, axis=0))
    spread = sem > 0
    low, high = stats.t.interval(CONFIDENCE, len(samples) - 1, loc=means,
                                 scale=np.where(spread, sem, 1.0))  # fmt: skip
    return np.where(spread, low, means).tolist(), np.where(spread, high, means).tolist()


@attrs.define(frozen=True)
class Comparison:
    """One metric of one group against the baseline group's."""

    group: int
    metric: str
    difference: float
    #: the Welch interval of the difference, its p-value and Holm's; None: no test
    low: float | None = None
    high: float | None = None
    p_value: float | None = None
    p_holm: float | None = None
    #: why there is no test, when there is none
    untested: str = ""

    @property
    def verdict(self) -> str:
        """Plain words: not significant, significant (which way), or why there is no test."""
        if self.p_holm is None:
            return self.untested
        if self.p_holm >= SIGNIFICANCE:
            return "not significant"
        return f"significant: {'lower' if self.difference < 0 else 'higher'} than the baseline"


def welch(group: int, metric: str, values: Estimate, baseline: Estimate) -> Comparison:
    """Welch's t-test of ``values`` against ``baseline``: the difference of means, its
    interval and the two-sided p-value (the Holm p is filled in by :func:`compare_groups`)."""
    difference = values.mean - baseline.mean
    if values.n < 2 or baseline.n < 2:
        return Comparison(group, metric, difference, untested="no test (needs 2+ runs in both)")
    if values.std == 0 and baseline.std == 0:
        return Comparison(group, metric, difference, untested="no test (no spread in either)")
    from scipy import stats

    result = stats.ttest_ind(values.values, baseline.values, equal_var=False)
    interval = result.confidence_interval(CONFIDENCE)
    return Comparison(group, metric, difference, float(interval.low), float(interval.high),
                      float(result.pvalue))  # fmt: skip


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979, "A simple sequentially rejective
    multiple test procedure"): the k-th smallest of m p-values times (m - k + 1), never
    below an earlier one, at most 1. scipy.stats has no Holm (false_discovery_control is
    Benjamini-Hochberg, which controls another error rate)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@attrs.define(frozen=True)
class MeanCurve:
    """A group's mean curve at the steps every run logged (finite), with the per-step
    t-interval across runs (None for one run)."""

    steps: list[int]
    mean: list[float]
    low: list[float] | None = None
    high: list[float] | None = None


def mean_curve(curves: Sequence[Curve]) -> MeanCurve:
    """The mean of ``curves`` at their common steps, and its band across them."""
    import numpy as np

    points = [dict(zip(c.steps, c.values, strict=True)) for c in curves]
    common = set(points[0]).intersection(*points[1:]) if points else set()
    steps = sorted(s for s in common if all(math.isfinite(p[s]) for p in points))
    samples = np.array([[p[s] for s in steps] for p in points], dtype=float)
    if not steps:
        return MeanCurve([], [])
    means = samples.mean(axis=0)
    if len(curves) < 2:
        return MeanCurve(steps, means.tolist())
    low, high = t_interval(means, samples)
    return MeanCurve(steps, means.tolist(), low, high)


@attrs.define
class GroupStats:
    """A group, its estimates by metric and its mean curves."""

    group: Group
    estimates: dict[str, Estimate]
    val_curve: MeanCurve
    train_curve: MeanCurve

    @property
    def n(self) -> int:
        """How many runs the group has."""
        return len(self.group.runs)


@attrs.define
class SeedAnalysis:
    """What ``slmkit compare`` says about groups of seeds."""

    groups: list[GroupStats]
    baseline: int
    comparisons: list[Comparison]
    #: (run_id, why) of each run left out of the statistics
    left_out: list[tuple[str, str]]

    @property
    def replicated(self) -> bool:
        """Whether any group has more than one run (so there are intervals and tests)."""
        return any(g.n > 1 for g in self.groups)


def analyse(records: Sequence[RunRecord], baseline: Sequence[str] = ()) -> SeedAnalysis:
    """Group the finished runs, estimate each group's metrics and compare every group with
    the baseline (``--baseline KEY=VALUE`` choices; the first group without any).

    Runs of different corpora, tokenizers or validation sets are refused when any group
    has seeds to compare (:func:`~slmkit.seed_groups.check_same_validation_set`).
    """
    kept, out = left_out(records)
    groups = group_runs(kept)
    if any(len(g.runs) > 1 for g in groups):
        check_same_validation_set(kept)
    if baseline and not groups:
        raise SlmkitError("--baseline: no finished run to choose a baseline group from")
    stats = [_group_stats(g) for g in groups]
    base = pick_baseline(groups, baseline) if groups else 0
    # with no group of two runs there is nothing to test: no comparisons, as before groups
    comparisons = compare_groups(stats, base) if any(g.n > 1 for g in stats) else []
    return SeedAnalysis(stats, base, comparisons, out)


def _group_stats(group: Group) -> GroupStats:
    estimates = {}
    for metric, field in METRICS.items():
        values = [getattr(r, field) for r in group.runs]
        finite = [float(v) for v in values if v is not None and math.isfinite(v)]
        if finite:
            estimates[metric] = estimate(finite)
    return GroupStats(group, estimates, mean_curve([r.val_curve for r in group.runs]),
                      mean_curve([r.train_curve for r in group.runs]))  # fmt: skip


def compare_groups(groups: Sequence[GroupStats], baseline: int) -> list[Comparison]:
    """Every other group against the baseline, metric by metric; each metric's p-values
    Holm-corrected over the groups compared."""
    comparisons: list[Comparison] = []
    base = groups[baseline].estimates if groups else {}
    for metric in METRICS:
        if metric not in base:
            continue
        others = [i for i, g in enumerate(groups) if i != baseline and metric in g.estimates]
        tested = [welch(i, metric, groups[i].estimates[metric], base[metric]) for i in others]
        adjusted = iter(holm([c.p_value for c in tested if c.p_value is not None]))
        comparisons += [c if c.p_value is None else attrs.evolve(c, p_holm=next(adjusted))
                        for c in tested]  # fmt: skip
    return sorted(comparisons, key=lambda c: (c.group, list(METRICS).index(c.metric)))


# -- shown: text rows and JSON -------------------------------------------------------------


def format_p(p: float | None) -> str:
    """A p-value to 4 decimals; a tiny one in scientific notation (never ``0.0000``)."""
    if p is None:
        return "-"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def format_interval(low: float | None, high: float | None, n: int = 2) -> str:
    """``[low, high]``; a group of one run has no interval, and says so."""
    if low is None or high is None:
        return "no interval (1 run)" if n < 2 else "-"
    return f"[{low:.4f}, {high:.4f}]"


def group_label(analysis: SeedAnalysis, index: int) -> str:
    """The group's label, marked when it is the baseline of a comparison."""
    label = analysis.groups[index].group.label
    return f"{label} (baseline)" if index == analysis.baseline and analysis.comparisons else label


INTERVAL = f"{CONFIDENCE:.0%} CI"


def group_rows(analysis: SeedAnalysis) -> list[list[str]]:
    """A header, then one row per group and metric: n, mean, std, interval of the mean."""
    rows = [["GROUP", "N", "METRIC", "MEAN", "STD", INTERVAL]]
    for i, stats in enumerate(analysis.groups):
        for j, metric in enumerate(METRICS):
            first = [group_label(analysis, i), str(stats.n)] if j == 0 else ["", ""]
            e = stats.estimates.get(metric)
            if e is None:
                rows.append([*first, metric, "-", "-", "(not logged)"])
                continue
            std = "-" if e.std is None else f"{e.std:.4f}"
            rows.append([*first, metric, f"{e.mean:.4f}", std, format_interval(e.low, e.high, e.n)])
    return rows


def comparison_rows(analysis: SeedAnalysis) -> list[list[str]]:
    """A header, then one row per group and metric against the baseline."""
    rows = [["GROUP", "METRIC", "DIFFERENCE", INTERVAL, "P", "P (HOLM)", "VERDICT"]]
    shown = -1
    for c in analysis.comparisons:
        label = group_label(analysis, c.group) if c.group != shown else ""
        shown = c.group
        rows.append([label, c.metric, f"{c.difference:+.4f}", format_interval(c.low, c.high),
                     format_p(c.p_value), format_p(c.p_holm), c.verdict])  # fmt: skip
    return rows


def comparison_heading(analysis: SeedAnalysis) -> str:
    """What the comparison table is, in one sentence."""
    others, baseline = len(analysis.groups) - 1, analysis.groups[analysis.baseline].group
    return (
        f"against the baseline {baseline.label}: difference of means"
        f" (group - baseline) with its {INTERVAL}, Welch's t-test, p corrected by Holm over"
        f" the {others} group{'s' if others > 1 else ''} compared; significant when p (Holm)"
        f" < {SIGNIFICANCE}:"
    )


def notes(analysis: SeedAnalysis) -> list[str]:
    """The lines that say why a table is missing, and which runs were left out."""
    lines = []
    if not analysis.groups:
        lines.append("(no finished run to group)")
    elif not analysis.replicated:
        lines.append("(every group is one run: no intervals and no tests; more seeds give them:"
                     " --sweep experiment.seed=1,2,3)")  # fmt: skip
    elif len(analysis.groups) == 1:
        lines.append("(one group: nothing to compare it with)")
    if analysis.left_out:
        lines.append("left out of the statistics: "
                     + ", ".join(f"{run} ({why})" for run, why in analysis.left_out))  # fmt: skip
    return lines


def analysis_json(analysis: SeedAnalysis) -> dict[str, Any]:
    """The groups, their statistics and curves, the comparisons and the runs left out."""
    groups = [g.group for g in analysis.groups]
    return {
        "statistics": {
            "confidence": CONFIDENCE,
            "significance_level": SIGNIFICANCE,
            "interval": "t-interval of the mean (sample std, ddof=1)",
            "test": "Welch's t-test, two-sided, each group against the baseline",
            "correction": "Holm, over the groups compared, per metric",
        },
        "groups": [
            {
                "label": g.group.label,
                # a key the group's runs lack: null
                "values": {k: None if v is MISSING else v for k, v in g.group.values.items()},
                "baseline": i == analysis.baseline,
                "n": g.n,
                "runs": [r.run_id for r in g.group.runs],
                "metrics": {m: _estimate_json(e) for m, e in g.estimates.items()},
                "val_curve": attrs.asdict(g.val_curve),
            }
            for i, g in enumerate(analysis.groups)
        ],
        "comparisons": [
            {
                "group": groups[c.group].label,
                "baseline": groups[analysis.baseline].label,
                "metric": c.metric,
                "difference": c.difference,
                "ci_low": c.low,
                "ci_high": c.high,
                "p_value": c.p_value,
                "p_holm": c.p_holm,
                "significant": None if c.p_holm is None else c.p_holm < SIGNIFICANCE,
                "verdict": c.verdict,
            }
            for c in analysis.comparisons
        ],
        "left_out": [{"run_id": run, "reason": why} for run, why in analysis.left_out],
    }


def _estimate_json(e: Estimate) -> dict[str, Any]:
    return {"n": e.n, "mean": e.mean, "std": e.std, "ci_low": e.low, "ci_high": e.high,
            "values": e.values}  # fmt: skip
