"""Probe metrics read back from a run's log: each metric's values over the evaluations.

A probe logs one event per evaluation at which it runs (see docs/probes.md)::

    {"event": "probe", "step": S, "probe": "induction", "plugin": "...",
     "metrics": {"score": [[...], ...], "loss_drop": 0.4, ...}}

Each metric value is a number (a scalar), a list of numbers (one per layer) or a list of
lists (``[layer][head]``). ``null`` (a non-finite value, see ``nonfinite``) reads as NaN.
Like the loss curves, the steps a resumed run trained again keep the resumed values.
Nothing here needs torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, cast

import attrs

from slmkit.runfiles import as_int, as_number

#: the shapes a metric value may have
SCALAR, PER_LAYER, LAYER_HEAD = "scalar", "per_layer", "layer_head"

#: a metric value as read back: a float, per layer, or per layer and head
Value = float | list[float] | list[list[float]]


@attrs.define
class ProbeMetric:
    """One metric of one probe: its values by step, in step order, all of one shape."""

    probe: str
    metric: str
    shape: str
    steps: list[int] = attrs.field(factory=list)
    values: list[Value] = attrs.field(factory=list)

    @property
    def key(self) -> str:
        """``probe.metric``: how tables, legends and JSON name it."""
        return f"{self.probe}.{self.metric}"

    @property
    def latest(self) -> Value:
        """The value at the latest evaluation."""
        return self.values[-1]

    def grid(self, index: int = -1) -> list[list[float]]:
        """The ``[layer][head]`` values at evaluation ``index`` (layer x head metrics)."""
        return cast("list[list[float]]", self.values[index])

    def layers(self, index: int = -1) -> list[float]:
        """Each layer's value at evaluation ``index`` (per-layer metrics)."""
        return cast("list[float]", self.values[index])

    def best_head(self, index: int = -1) -> tuple[int, int, float]:
        """``(layer, head, value)`` of the highest head at evaluation ``index``."""
        cells = [(v, layer, head) for layer, row in enumerate(self.grid(index))
                 for head, v in enumerate(row) if not math.isnan(v)]  # fmt: skip
        if not cells:
            return 0, 0, math.nan
        value, layer, head = max(cells)
        return layer, head, value

    def head_summary(self, reduce: str) -> list[float]:
        """Each evaluation's ``max`` or ``min`` over every head, NaN ignored."""
        pick = max if reduce == "max" else min
        out = []
        for index in range(len(self.values)):
            cells = [v for row in self.grid(index) for v in row if not math.isnan(v)]
            out.append(pick(cells) if cells else math.nan)
        return out

    def layer_series(self, layer: int) -> list[float]:
        """One layer's value at each evaluation (per-layer metrics; NaN where it is missing)."""
        values = (self.layers(i) for i in range(len(self.values)))
        return [v[layer] if layer < len(v) else math.nan for v in values]

    @property
    def n_layers(self) -> int:
        """The most layers any evaluation logged (per-layer and 2-D metrics)."""
        return max((len(v) for v in self.values if isinstance(v, list)), default=0)

    def as_json(self) -> dict[str, Any]:
        """``{"shape", "steps", "values"}``, NaN as ``null``."""
        return {"shape": self.shape, "steps": self.steps, "values": _plain(self.values)}


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _number(value: Any) -> float | None:
    """A logged number; ``null`` (non-finite) is NaN; anything else is None (malformed)."""
    if value is None:
        return math.nan
    number = as_number(value)
    return None if number is None else float(number)


def parse_value(value: Any) -> tuple[str, Value] | None:
    """A metric value's shape and its floats; None when it has none of the three shapes."""
    number = _number(value)
    if number is not None:
        return SCALAR, number
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(row, list) and row for row in value):
        grid = [_numbers(row) for row in value]
        return None if any(row is None for row in grid) else (LAYER_HEAD, cast(Any, grid))
    numbers = _numbers(value)
    return None if numbers is None else (PER_LAYER, numbers)


def _numbers(values: list[Any]) -> list[float] | None:
    """A list of logged numbers; None when one of them is not a number."""
    numbers = [_number(v) for v in values]
    return None if any(v is None for v in numbers) else cast("list[float]", numbers)


def probe_metrics(events: Iterable[dict[str, Any]], problems: list[str]) -> list[ProbeMetric]:
    """Every probe metric of a log, in the order first logged; malformed events or values
    (not one of the three shapes, a shape that changes) are left out as one problem."""
    points: dict[tuple[str, str], dict[int, tuple[str, Value]]] = {}
    malformed = 0
    for event in events:
        resumed = as_int(event.get("resumed_from_step"))
        if event["event"] == "run_start" and resumed is not None:
            for series in points.values():  # steps past the checkpoint were trained again
                for retrained in [s for s in series if s > resumed]:
                    del series[retrained]
        if event["event"] != "probe":
            continue
        step = as_int(event.get("step"))
        probe, metrics = event.get("probe"), event.get("metrics")
        if step is None or not isinstance(probe, str) or not isinstance(metrics, dict):
            malformed += 1
            continue
        for name, value in metrics.items():
            parsed = parse_value(value)
            series = points.setdefault((probe, str(name)), {})
            shapes = {shape for shape, _ in series.values()}
            if parsed is None or (shapes and parsed[0] not in shapes):
                malformed += 1
            else:
                series[step] = parsed
    if malformed:
        problems.append(f"log.jsonl: {malformed} malformed probe event(s) or metric value(s)")
    out = []
    for (probe, name), series in points.items():
        if series:
            steps = sorted(series)
            shape = series[steps[0]][0]
            out.append(ProbeMetric(probe, name, shape, steps, [series[s][1] for s in steps]))
    return out


def by_probe(metrics: Sequence[ProbeMetric]) -> dict[str, list[ProbeMetric]]:
    """The metrics grouped by probe, in the order first logged."""
    groups: dict[str, list[ProbeMetric]] = {}
    for metric in metrics:
        groups.setdefault(metric.probe, []).append(metric)
    return groups


def probes_json(metrics: Sequence[ProbeMetric]) -> dict[str, dict[str, Any]]:
    """``{probe: {metric: {"shape", "steps", "values"}}}`` for ``compare --json``."""
    return {probe: {m.metric: m.as_json() for m in group}
            for probe, group in by_probe(metrics).items()}  # fmt: skip


def latest_text(metric: ProbeMetric) -> str:
    """The latest value as the text table shows it: a scalar, each layer's value, or the
    highest head with its place (``0.93 (L1 H2)``)."""
    if metric.shape == SCALAR:
        return f"{metric.latest:.4f}"
    if metric.shape == PER_LAYER:
        return " ".join(f"{v:.4f}" for v in metric.layers())
    layer, head, value = metric.best_head()
    return f"{value:.4f} (L{layer} H{head})"


def latest_rows(runs: Sequence[tuple[str, Sequence[ProbeMetric]]]) -> list[list[str]]:
    """The table of ``compare``: per run and metric, the latest step and value; a 2-D
    metric shows its highest head."""
    rows = [["RUN_ID", "METRIC", "STEP", "LATEST (2-D: highest head)"]]
    for run_id, metrics in runs:
        for m in metrics:
            rows.append([run_id, m.key, str(m.steps[-1]), latest_text(m)])
    return rows
