"""The probes picture of ``slmkit compare``: probe metrics over training, and the heads at the
latest evaluation.

Top, one panel per probe, every run in its colour (as in the loss curves): the probe's
scalars (one line style each) and per-layer metrics (a line per layer, named ``L0``, ``L1``...
at its end) against step on the left axis; its layer x head metrics on the right axis (on
the left when the probe has nothing else), as the band between the lowest and the highest
head with the highest head drawn as a line, and a vertical line where a score's highest
head first passes :data:`FORMED_SCORE` (the head has formed: the induction heads' phase
change shows as the loss curves bending at that line). Below, for the first
:data:`HEATMAP_RUNS` runs, a heatmap of each layer x head metric at the run's latest
evaluation. Needs matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, cast

from slmkit.compare import FIGURE_DPI, legend_columns, legend_keys, run_label
from slmkit.errors import SlmkitError
from slmkit.pictures import figure_class, png_bytes
from slmkit.probe_curves import LAYER_HEAD, SCALAR, ProbeMetric, by_probe
from slmkit.runs import RunRecord

if TYPE_CHECKING:  # matplotlib is an optional extra, imported when a picture is drawn
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, FigureBase, SubFigure

    LineStyle = Literal["-", "--", ":", "-."]

#: runs whose heads are drawn as heatmaps (the curves show every run)
HEATMAP_RUNS = 4
#: panels side by side, at most (fewer when there are fewer to draw, so they are wider)
COLUMNS = 3
#: a score (a head's share of attention on its pattern's position) above which a head
#: counts as formed: docs/probes.md calls such a head an induction (previous-token) head
FORMED_SCORE = 0.5
#: the picture's width, the height of a row of curve panels, inches
WIDTH_INCHES = 12.0
CURVE_ROW_INCHES = 3.4
#: a heatmap row: this much, plus this much per layer
HEATMAP_BASE_INCHES = 1.6
HEATMAP_LAYER_INCHES = 0.3
#: heatmaps with at most this many cells print each cell's value
ANNOTATED_CELLS = 64
#: the legend of runs below the picture
LEGEND_INCHES = 0.25
#: a probe's scalars and per-layer metrics, told apart by line style (colours are runs)
LINE_STYLES: tuple[LineStyle, ...] = ("-", "--", ":", "-.")


def has_probes(records: Sequence[RunRecord]) -> bool:
    """Whether any run logged probe metrics (no picture is drawn otherwise)."""
    return any(r.probes for r in records)


def probes_png(records: Sequence[RunRecord]) -> bytes:
    """The probes picture as PNG bytes; the runs must have probe metrics."""
    return png_bytes(probes_figure(records), FIGURE_DPI)


def heatmap_runs(records: Sequence[RunRecord], limit: int | None = HEATMAP_RUNS) -> list[RunRecord]:
    """The runs whose heads are drawn: the first ``limit`` with a layer x head metric."""
    return [r for r in records if any(m.shape == LAYER_HEAD for m in r.probes)][:limit]


def probes_figure(records: Sequence[RunRecord]) -> Figure:
    """The picture :func:`probes_png` draws, as a matplotlib figure."""
    if not has_probes(records):
        raise SlmkitError("no run logged probe metrics: add [[probes]] to the experiment")
    Figure = figure_class("probes picture")
    probes = list(dict.fromkeys(m.probe for r in records for m in r.probes))
    heads = heatmap_runs(records)
    grids = list(dict.fromkeys(m.key for r in heads for m in r.probes if m.shape == LAYER_HEAD))
    curve_rows = math.ceil(len(probes) / COLUMNS)
    grid_rows = math.ceil(len(grids) / COLUMNS)
    layers = max((m.n_layers for r in heads for m in r.probes if m.shape == LAYER_HEAD),
                 default=0)  # fmt: skip
    heat_height = len(heads) * grid_rows * (HEATMAP_BASE_INCHES + HEATMAP_LAYER_INCHES * layers)
    keys = legend_keys(records)
    labels = [run_label(r, keys) for r in records]
    per_row = legend_columns(len(labels))
    legend_lines = sum(max(label.count("\n") + 1 for label in labels[i : i + per_row])
                       for i in range(0, len(labels), per_row))  # fmt: skip
    height = curve_rows * CURVE_ROW_INCHES + heat_height + legend_lines * LEGEND_INCHES + 0.6
    figure = Figure(figsize=(WIDTH_INCHES, height), dpi=FIGURE_DPI, layout="constrained")
    if heads:
        ratios = [curve_rows * CURVE_ROW_INCHES, heat_height]
        top, bottom = cast("Sequence[SubFigure]", figure.subfigures(2, 1, height_ratios=ratios))
        _draw_curves(top, records, probes)
        _draw_heatmaps(bottom, heads, grids, grid_rows)
    else:
        _draw_curves(figure, records, probes)
    from matplotlib.lines import Line2D

    runs = [Line2D([], [], color=f"C{i % 10}", linewidth=2, label=label)
            for i, label in enumerate(labels)]  # fmt: skip
    figure.legend(handles=runs, loc="outside lower center", ncols=legend_columns(len(records)),
                  fontsize="small")  # fmt: skip
    title = "probe metrics over training"
    if heads:
        title += "; each head at the latest evaluation"
        if len(heads) < len(heatmap_runs(records, limit=None)):
            title += f" of the first {len(heads)} runs"
    figure.suptitle(title)
    return figure


def _draw_curves(figure: FigureBase, records: Sequence[RunRecord], probes: list[str]) -> None:
    """One panel per probe, :data:`COLUMNS` side by side at most; every run in its colour."""
    columns = min(COLUMNS, len(probes))
    panels = figure.subplots(math.ceil(len(probes) / columns), columns, squeeze=False).flatten()
    for axes in panels[len(probes) :]:
        axes.set_visible(False)
    for axes, probe in zip(panels, probes, strict=False):
        _draw_probe(axes, probe, records)


def _draw_probe(axes: Axes, probe: str, records: Sequence[RunRecord]) -> None:
    """A probe's scalars and per-layer metrics on the left axis, its layer x head metrics on
    the right one (on the left when it has nothing else)."""
    runs = [by_probe(r.probes).get(probe, []) for r in records]
    flat = list(dict.fromkeys(m.metric for ms in runs for m in ms if m.shape != LAYER_HEAD))
    grids = list(dict.fromkeys(m.metric for ms in runs for m in ms if m.shape == LAYER_HEAD))
    styles = {name: LINE_STYLES[i % len(LINE_STYLES)] for i, name in enumerate(flat)}
    heads = axes.twinx() if flat and grids else axes
    band_alpha = max(0.04, 0.2 / len(records))  # bands of many runs pile up: fainter then
    for i, metrics in enumerate(runs):
        color = f"C{i % 10}"
        for m in metrics:
            if m.shape == LAYER_HEAD:
                _draw_head_band(heads, m, i, band_alpha)
            else:
                _draw_flat(axes, m, color, styles[m.metric])
    _label_probe(axes, heads if grids else None, probe, styles, grids)


def _draw_flat(axes: Axes, metric: ProbeMetric, color: str, style: LineStyle) -> None:
    """A scalar as one line; a per-layer metric as a line per layer, named at its end."""
    if metric.shape == SCALAR:
        axes.plot(metric.steps, metric.values, color=color, linestyle=style, marker=".")
        return
    for layer in range(metric.n_layers):
        values = metric.layer_series(layer)
        width = 0.8 + 1.2 * layer / max(1, metric.n_layers - 1)  # deeper layers bolder
        axes.plot(metric.steps, values, color=color, linestyle=style, linewidth=width)  # fmt: skip
        axes.annotate(f"L{layer}", (metric.steps[-1], values[-1]), xytext=(3, 0),
                      textcoords="offset points", fontsize="x-small", color=color,
                      va="center")  # fmt: skip


def _draw_head_band(axes: Axes, metric: ProbeMetric, run: int, alpha: float) -> None:
    """The band from the lowest to the highest head; the highest head as a line; for a
    score, the step where it first passes :data:`FORMED_SCORE` from below (the ``run``-th
    run's note a line lower than the one before, so that they do not cover each other)."""
    color = f"C{run % 10}"
    highest = metric.head_summary("max")
    lowest = metric.head_summary("min")
    axes.fill_between(metric.steps, lowest, highest, color=color, alpha=alpha, linewidth=0)
    axes.plot(metric.steps, highest, color=color, linewidth=2, marker="o", markersize=3)
    layer, head, value = metric.best_head()
    axes.annotate(f"L{layer} H{head}", (metric.steps[-1], value), xytext=(3, 0),
                  textcoords="offset points", fontsize="x-small", color=color,
                  va="center")  # fmt: skip
    formed = formed_step(metric) if metric.metric.endswith("score") else None
    if formed is not None:
        axes.axvline(formed, color=color, linestyle=":", linewidth=1)
        axes.annotate(f"> {FORMED_SCORE:g} at step {formed}", (formed, 1.0),
                      xycoords=("data", "axes fraction"), xytext=(3, -3 - 9 * run),
                      textcoords="offset points", fontsize="x-small", color=color,
                      va="top")  # fmt: skip


def formed_step(metric: ProbeMetric) -> int | None:
    """The first step where the highest head's score passes :data:`FORMED_SCORE`, after
    starting at or below it (None: it never does, or it was above from the start)."""
    highest = metric.head_summary("max")
    if not highest or not highest[0] <= FORMED_SCORE:
        return None
    return next((s for s, v in zip(metric.steps, highest, strict=True) if v > FORMED_SCORE), None)


def _label_probe(
    axes: Axes, heads: Axes | None, probe: str, styles: dict[str, LineStyle], grids: list[str]
) -> None:
    """Title, axis labels, and a legend of the line styles (in grey: colours are runs)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    axes.set_title(probe)
    axes.set_xlabel("step")
    axes.grid(True, alpha=0.3)
    axes.margins(x=0.12)  # room for the names at the lines' ends
    handles: list[Artist] = [
        Line2D([], [], color="0.3", linestyle=style, label=name) for name, style in styles.items()
    ]
    if len(styles) == 1:  # several: the legend names them
        axes.set_ylabel(next(iter(styles)))
    elif styles and all(name.startswith("loss") for name in styles):
        axes.set_ylabel("loss (nats)")
    if heads is not None:
        names = ", ".join(grids)
        heads.set_ylabel(f"{names} (highest head)")
        if all(name.endswith("score") for name in grids):
            heads.set_ylim(-0.02, 1.02)
        handles.append(Line2D([], [], color="0.3", linewidth=2, marker="o", markersize=3,
                              label=f"{names}: highest head"))  # fmt: skip
        handles.append(Patch(color="0.3", alpha=0.15, label="lowest to highest head"))
    # "best" sees only this axis's lines, not the heads' on the right axis: with both, the
    # left middle (high losses and low scores early, low losses and high scores late) is
    # where the curves of a forming head leave room
    twin = heads is not None and heads is not axes
    axes.legend(handles=handles, fontsize="x-small", loc="center left" if twin else "best")


def _draw_heatmaps(
    figure: SubFigure, runs: Sequence[RunRecord], grids: list[str], rows_per_run: int
) -> None:
    """A heatmap of each layer x head metric at each run's latest evaluation; scores on
    [0, 1], other metrics on the range of the values shown (shared by the runs)."""
    columns = min(COLUMNS, len(grids))
    panels = figure.subplots(len(runs) * rows_per_run, columns, squeeze=False)
    ranges = {key: _value_range(key, runs) for key in grids}
    for r, record in enumerate(runs):
        metrics = {m.key: m for m in record.probes if m.shape == LAYER_HEAD}
        cells = panels[r * rows_per_run : (r + 1) * rows_per_run].flatten()
        for axes in cells[len(grids) :]:
            axes.set_visible(False)
        for axes, key in zip(cells, grids, strict=False):
            if key not in metrics:
                axes.set_visible(False)
                continue
            _heatmap(figure, axes, metrics[key], ranges[key], record.run_id)


def _value_range(key: str, runs: Sequence[RunRecord]) -> tuple[float, float]:
    if key.endswith("score"):
        return 0.0, 1.0
    values = [v for r in runs for m in r.probes if m.key == key
              for row in m.grid() for v in row if not math.isnan(v)]  # fmt: skip
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _heatmap(
    figure: SubFigure, axes: Axes, metric: ProbeMetric, value_range: tuple[float, float],
    run_id: str,
) -> None:  # fmt: skip
    grid = metric.grid()
    heads = max(len(row) for row in grid)
    padded = [row + [math.nan] * (heads - len(row)) for row in grid]
    low, high = value_range
    image = axes.imshow(padded, vmin=low, vmax=high, cmap="viridis", aspect="auto",
                        interpolation="nearest")  # fmt: skip
    axes.set_xticks(range(heads))
    axes.set_yticks(range(len(grid)))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(f"{run_id}\n{metric.key}, step {metric.steps[-1]}", fontsize="small")
    if len(grid) * heads <= ANNOTATED_CELLS:
        for layer, row in enumerate(padded):
            for head, value in enumerate(row):
                if not math.isnan(value):
                    dark = (value - low) / (high - low) < 0.6
                    axes.text(head, layer, f"{value:.2f}", ha="center", va="center",
                              fontsize="x-small", color="white" if dark else "black")  # fmt: skip
    figure.colorbar(image, ax=axes, shrink=0.9)
