"""Runs side by side: what differs in their experiments, their metrics, their groups of
seeds (:mod:`slmkit.seed_stats`), their loss curves.

The loss-curve picture needs matplotlib, the optional extra ``slmkit[plot]``;
:mod:`slmkit.compare_report` embeds it in the HTML report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from slmkit.config.diff import changed_keys
from slmkit.pictures import figure_class, png_bytes
from slmkit.probe_curves import latest_rows, probes_json
from slmkit.run_segments import ENVIRONMENT_KEYS
from slmkit.runs import RunRecord, lookup
from slmkit.runs_table import format_value, table_rows, with_floor_columns
from slmkit.seed_stats import (
    CONFIDENCE,
    INTERVAL,
    GroupStats,
    SeedAnalysis,
    analyse,
    analysis_json,
    comparison_heading,
    comparison_rows,
    group_rows,
    notes,
)
from slmkit.table import format_table

if TYPE_CHECKING:  # matplotlib is an optional extra, imported when a picture is drawn
    from matplotlib.figure import Figure

#: the picture's size: inches x dpi = pixels (tests check the decoded size); a legend of
#: more than LEGEND_LINES lines adds LEGEND_LINE_INCHES to the height for each more
FIGURE_INCHES = (12.0, 4.5)
FIGURE_DPI = 100
LEGEND_LINES = 4
LEGEND_LINE_INCHES = 0.19
#: the longest line of ``key=value`` pairs in a legend label, in characters
LEGEND_LINE_CHARS = 80


def differing_keys(records: Sequence[RunRecord]) -> list[str]:
    """Dotted experiment keys whose values are not the same in every run.

    ``experiment.name`` is left out when it is the only difference a sweep makes, as are
    keys that only name where a run went (``experiment.runs_dir``). Runs whose
    ``experiment.toml`` could not be read (damaged) take no part.
    """
    readable = [r for r in records if r.experiment]
    keys: set[str] = set()
    for other in readable[1:]:
        keys.update(changed_keys(readable[0].experiment, other.experiment))
    keys.discard("experiment.runs_dir")
    return sorted(keys)


def config_diff_rows(records: Sequence[RunRecord]) -> list[list[str]]:
    """A header row of run ids, then one row per differing key."""
    rows = [["KEY", *(r.run_id for r in records)]]
    for key in differing_keys(records):
        rows.append([key, *(experiment_value(r, key) for r in records)])
    return rows


def experiment_value(record: RunRecord, key: str) -> str:
    """A run's value of a dotted key as the diff shows it; ``?`` when it is unreadable."""
    return format_value(lookup(record.experiment, key)) if record.experiment else "?"


def environment_value(record: RunRecord, key: str) -> str:
    """A run's value of an environment field: ``2 -> 1`` when a resume changed it."""
    values = record.environment.get(key)
    if values is None:
        return "(absent)"
    if key == "git_commit":
        values = [v[:12] if isinstance(v, str) else v for v in values]
    return " -> ".join("-" if v is None else format_value(v) for v in values)


def environment_keys(records: Sequence[RunRecord]) -> list[str]:
    """The recorded environment fields (threads, versions, device, commit...) whose values
    are not the same in every run, in the order of :data:`ENVIRONMENT_KEYS`."""
    order = {key: i for i, key in enumerate(ENVIRONMENT_KEYS)}
    keys = {key for r in records for key in r.environment}
    differing = [k for k in keys if len({environment_value(r, k) for r in records}) > 1]
    return sorted(differing, key=lambda k: (order.get(k, len(order)), k))


def environment_diff_rows(records: Sequence[RunRecord]) -> list[list[str]]:
    """A header row of run ids, then one row per differing environment field."""
    rows = [["KEY", *(r.run_id for r in records)]]
    for key in environment_keys(records):
        rows.append([key, *(environment_value(r, key) for r in records)])
    return rows


#: the metrics ``slmkit compare`` shows side by side
METRIC_COLUMNS = ("RUN_ID", "STATUS", "STEPS", "TOKENS", "TRAIN_LOSS", "VAL_LOSS", "BEST_VAL",
                  "BPC", "TOK/S", "CONFIG", "COMMIT", "STARTED (UTC)")  # fmt: skip


def metric_rows(records: Sequence[RunRecord]) -> list[list[str]]:
    """One row per run: status, steps, tokens seen, losses, speed, provenance."""
    return table_rows(records, with_floor_columns(records, METRIC_COLUMNS))


def comparison_text(records: Sequence[RunRecord], analysis: SeedAnalysis | None = None) -> str:
    """What ``slmkit compare`` prints: the config and environment differences, the metrics,
    then the groups of seeds (``analysis``, made from ``records`` when not given)."""
    diff, env = config_diff_rows(records), environment_diff_rows(records)
    out = [f"config differences ({len(diff) - 1} keys):"]
    out.append(format_table(diff) if len(diff) > 1 else "(the experiments are identical)\n")
    hashes = {r.config_hash or "" for r in records}
    if len(diff) > 1 and len(hashes) == 1 and "" not in hashes:  # max_steps, threads
        out[-1] += f"(one config_hash, {hashes.pop()[:12]}: these keys are not part of it)\n"
    out.append(f"environment differences ({len(env) - 1} keys):")
    out.append(format_table(env) if len(env) > 1 else "(the recorded environments are identical)\n")
    out.append("metrics:")
    out.append(format_table(metric_rows(records)))
    if any(r.probes for r in records):
        out.append(f"{PROBES_HEADING}:")
        out.append(format_table(probe_rows(records)))
    return "\n".join([*out, seed_text(analysis or analyse(records))])


#: what the table of probe metrics is called (text and HTML report)
PROBES_HEADING = "probes (latest evaluation; a layer x head metric: its highest head)"


def probe_rows(records: Sequence[RunRecord]) -> list[list[str]]:
    """Each run's probe metrics at its latest evaluation (docs/probes.md)."""
    return latest_rows([(r.run_id, r.probes) for r in records])


def seed_text(analysis: SeedAnalysis) -> str:
    """The groups of seeds: each group's statistics, each group against the baseline."""
    count = f"{len(analysis.groups)} group{'s' if len(analysis.groups) != 1 else ''}"
    out = [f"groups of seeds ({count} of runs whose experiments differ only in the seed; "
           f"{INTERVAL}: the t-interval of the mean):"]  # fmt: skip
    if analysis.groups:
        out.append(format_table(group_rows(analysis)))
    if analysis.comparisons:
        out += [comparison_heading(analysis), format_table(comparison_rows(analysis))]
    return "\n".join([*out, *notes(analysis)]).rstrip("\n") + "\n"


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key by its shortest last parts that no other key ends with (so
    ``sampling.every`` beside ``training.eval_every``, but ``learning_rate``)."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if not any(o != key and o.endswith(name) for o in keys):
                break
        names[key] = name
    return names


def legend_keys(records: Sequence[RunRecord]) -> list[str]:
    """What tells the runs apart in the picture: every differing experiment key but the
    name, then every differing environment field (as ``env.<field>``)."""
    keys = [k for k in differing_keys(records) if k != "experiment.name"]
    return keys + [f"env.{k}" for k in environment_keys(records)]


def run_label(record: RunRecord, keys: Sequence[str]) -> str:
    """A legend label: the run id, then its value of every key, wrapped into short lines."""
    names, pairs = short_names(keys), []
    for key in keys:
        if key.startswith("env."):
            value = environment_value(record, key.removeprefix("env."))
        else:
            value = format_value(lookup(record.experiment, key))
        pairs.append(f"{names[key]}={value}")
    return wrapped_label(record.run_id, pairs)


def group_legend_label(stats: GroupStats) -> str:
    """A legend label of a group of seeds: how many runs, then its value of every key the
    groups differ in."""
    names = short_names(list(stats.group.values))
    pairs = [f"{names[k]}={format_value(v)}" for k, v in stats.group.values.items()]
    first = f"mean of {stats.n} seeds" if stats.n > 1 else f"1 run, {stats.group.runs[0].run_id}"
    return wrapped_label(first, pairs)


def wrapped_label(first_line: str, pairs: Sequence[str]) -> str:
    """``first_line``, then the ``key=value`` pairs in lines of :data:`LEGEND_LINE_CHARS`."""
    lines = [first_line]
    current = ""
    for pair in pairs:
        if current and len(current) + 2 + len(pair) > LEGEND_LINE_CHARS:
            lines.append(current)
            current = ""
        current = f"{current}, {pair}" if current else pair
    return "\n".join([*lines, current] if current else lines)


def figure_size(labels: Sequence[str]) -> tuple[float, float]:
    """The picture's size in inches: :data:`FIGURE_INCHES`, taller when the legend needs
    more than :data:`LEGEND_LINES` lines (it sits below the plots, never on them)."""
    ncols = legend_columns(len(labels))
    rows = [labels[i : i + ncols] for i in range(0, len(labels), ncols)]
    lines = sum(max(label.count("\n") + 1 for label in row) for row in rows)
    width, height = FIGURE_INCHES
    return width, height + max(0, lines - LEGEND_LINES) * LEGEND_LINE_INCHES


def legend_columns(n_runs: int) -> int:
    """Legend entries side by side."""
    return min(n_runs, 2)


def loss_curves_png(records: Sequence[RunRecord], analysis: SeedAnalysis | None = None) -> bytes:
    """Training (solid) and validation (dashed, dots) loss against step and tokens seen:
    each group's mean and band when ``analysis`` has groups of seeds, else each run's."""
    return png_bytes(loss_curves_figure(records, analysis), FIGURE_DPI)


def loss_curves_figure(
    records: Sequence[RunRecord], analysis: SeedAnalysis | None = None
) -> Figure:
    """The picture :func:`loss_curves_png` draws, as a matplotlib figure."""
    if analysis is not None and analysis.replicated:
        return group_curves_figure(analysis)
    keys = legend_keys(records)
    labels = [run_label(r, keys) for r in records]
    figure, (by_step, by_tokens) = _empty_figure(labels)
    for i, (r, label) in enumerate(zip(records, labels, strict=True)):
        color = f"C{i % 10}"
        per_step = r.tokens_per_step or 0
        for axes, scale in ((by_step, 1), (by_tokens, per_step)):
            if scale == 0:
                continue  # tokens per step unknown (no experiment.toml): no x values
            axes.plot([s * scale for s in r.train_curve.steps], r.train_curve.values,
                      color=color, linewidth=1, alpha=0.8)  # fmt: skip
            axes.plot([s * scale for s in r.val_curve.steps], r.val_curve.values,
                      color=color, linestyle="--", marker="o", markersize=3)  # fmt: skip
            if r.floor_per_token is not None:  # the best loss any model can reach
                axes.axhline(r.floor_per_token, color=color, linestyle=":", linewidth=1.5)
        train_line = by_step.lines[-3 if r.floor_per_token is not None else -2]
        train_line.set_label(label)  # one legend entry per run
    floors = any(r.floor_per_token is not None for r in records)
    _finish(figure, len(records), "training (solid) and validation (dashed) loss"
            + (", the corpus's floor (dotted)" if floors else ""))  # fmt: skip
    return figure


def group_curves_figure(analysis: SeedAnalysis) -> Figure:
    """Each group's mean training (solid) and validation (dashed) loss over its seeds, at
    the steps all its runs logged, the validation mean in a band: its t-interval."""
    labels = [group_legend_label(g) for g in analysis.groups]
    figure, (by_step, by_tokens) = _empty_figure(labels)
    floors = False
    for i, (stats, label) in enumerate(zip(analysis.groups, labels, strict=True)):
        color, first = f"C{i % 10}", stats.group.runs[0]
        train, val = stats.train_curve, stats.val_curve
        for axes, scale in ((by_step, 1), (by_tokens, first.tokens_per_step or 0)):
            if scale == 0:
                continue  # tokens per step unknown (no experiment.toml): no x values
            axes.plot([s * scale for s in train.steps], train.mean, color=color, linewidth=1,
                      alpha=0.6)  # fmt: skip
            x = [s * scale for s in val.steps]
            axes.plot(x, val.mean, color=color, linestyle="--", marker="o", markersize=3,
                      label=label if axes is by_step else None)  # fmt: skip
            if val.low is not None and val.high is not None:
                axes.fill_between(x, val.low, val.high, color=color, alpha=0.2, linewidth=0)
            if first.floor_per_token is not None:  # the best loss any model can reach
                floors = True
                axes.axhline(first.floor_per_token, color=color, linestyle=":", linewidth=1.5)
    _finish(figure, len(labels), "mean training (solid) and validation (dashed) loss of each "
            f"group's seeds; band: {CONFIDENCE:.0%} t-interval of the validation mean"
            + (", the corpus's floor (dotted)" if floors else ""))  # fmt: skip
    return figure


def _empty_figure(labels: Sequence[str]) -> tuple[Figure, Any]:
    """A figure sized for ``labels`` with two plots side by side sharing the loss axis."""
    Figure = figure_class("loss-curve picture")
    figure = Figure(figsize=figure_size(labels), dpi=FIGURE_DPI, layout="constrained")
    return figure, figure.subplots(1, 2, sharey=True)


def _finish(figure: Figure, entries: int, title: str) -> None:
    """Axis labels, grids, the legend below the plots, the title."""
    by_step, by_tokens = figure.axes
    by_step.set_xlabel("step")
    by_tokens.set_xlabel("training tokens seen")
    by_step.set_ylabel("loss (nats/token)")
    for axes in (by_step, by_tokens):
        axes.grid(True, alpha=0.3)
    # Below the plots, so it never hides a curve however many runs there are.
    figure.legend(loc="outside lower center", ncols=legend_columns(entries), fontsize="small")
    figure.suptitle(title)


def summary_for_json(
    records: Sequence[RunRecord], analysis: SeedAnalysis | None = None
) -> dict[str, Any]:
    """``slmkit compare --json``: the differing keys with each run's value, metrics, and the
    groups of seeds with their statistics, comparisons and the runs left out."""
    keys = differing_keys(records)
    return {
        "runs": [r.as_json() for r in records],
        "differences": {
            key: {r.run_id: lookup(r.experiment, key, None) for r in records} for key in keys
        },
        "environment_differences": {
            key: {r.run_id: r.environment.get(key) for r in records}
            for key in environment_keys(records)
        },
        **analysis_json(analysis or analyse(records)),
        "probes": {r.run_id: probes_json(r.probes) for r in records},
    }
