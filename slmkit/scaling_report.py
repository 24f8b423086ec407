"""``slmkit scaling``: a scaling law fitted to runs, printed, drawn and reported.

The runs (named, or a sweep's) become points (:mod:`slmkit.scaling_points`); ``L(N)`` is
fitted to them or, when they saw different numbers of tokens, ``L(N, D)``
(:mod:`slmkit.scaling`). The command prints each parameter with its bootstrap interval,
the points and their residuals, a held-out run's prediction against its measured loss,
and the compute-optimal allocation for a budget; it can write the log-log picture and a
self-contained HTML report. Every check is made and everything computed before the first
file is written, and each file is written atomically, so a refusal writes nothing.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from slmkit.errors import SlmkitError
from slmkit.rundir import write_atomic
from slmkit.runs import RunRecord, list_runs, read_run, resolve_run
from slmkit.scaling import HUBER_DELTA, LAW_N, LAW_ND, LEVEL, Estimate, Fit, Points, fit_law
from slmkit.scaling_points import LeftOut, RunPoint, as_point, check_measured_alike, points_of
from slmkit.table import format_table

if TYPE_CHECKING:  # matplotlib is an optional extra, imported when a picture is drawn
    from matplotlib.figure import Figure

#: the picture's size: inches x dpi = pixels
FIGURE_INCHES = (8.0, 5.5)
FIGURE_DPI = 100


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
    return f" ({len(left_out)} unfinished run(s) left out: {left_out_text(left_out)})"


def left_out_text(left_out: Sequence[LeftOut]) -> str:
    """``id (why), id (why)``."""
    return ", ".join(f"{r.run_id} ({r.why})" for r in left_out)


# -- text and JSON -------------------------------------------------------------------------


def _interval(e: Estimate, fmt: str) -> str:
    return f"[{e.low:{fmt}}, {e.high:{fmt}}]"


def study_text(study: Study) -> str:
    """What ``slmkit scaling`` prints."""
    fit, law = study.fit, study.fit.law
    tokens = {p.d for p in study.points}
    seen = f"every run saw D = {tokens.pop():,} tokens" if len(tokens) == 1 else "D: tokens seen"
    out = [f"{law.formula}, fitted to {len(study.points)} runs "
           f"(N: non-embedding parameters; {seen})"]  # fmt: skip
    rows = [["PARAMETER", "VALUE", f"{LEVEL:.0%} INTERVAL"]]
    rows += [[name, f"{e.value:.4g}", _interval(e, ".4g")] for name, e in fit.parameters().items()]
    out.append(format_table(rows).rstrip("\n"))
    failed = f", {fit.failed_resamples} of them did not converge" if fit.failed_resamples else ""
    out.append(
        f"(Huber loss on log L, delta {HUBER_DELTA:g}, from the {fit.n_starts} best starts of "
        f"a grid; intervals: percentile bootstrap over runs, {fit.resamples} resamples{failed})"
    )
    rows = [["RUN_ID", "N", "D", "VAL_LOSS", "FIT", "RESIDUAL"]]
    for p in study.points:
        predicted = float(fit.predict(p.n, p.d)[0])
        rows.append([p.run_id, f"{p.n:,}", f"{p.d:,}", f"{p.loss:.4f}", f"{predicted:.4f}",
                     f"{p.loss - predicted:+.4f}"])  # fmt: skip
    out.append(format_table(rows).rstrip("\n"))
    prediction = study.prediction()
    if study.held_out is not None and prediction is not None:
        h = study.held_out
        out.append(
            f"held out {h.run_id} (N = {h.n:,}, D = {h.d:,}): predicted {prediction.value:.4f} "
            f"{_interval(prediction, '.4f')}, measured {h.loss:.4f}: off by "
            f"{h.loss - prediction.value:+.4f} nats"
        )
    allocation = study.allocation()
    if allocation is not None and study.budget is not None:
        n, d, loss = allocation["N"], allocation["D"], allocation["L"]
        out.append(
            f"compute-optimal at C = {study.budget:.3g} FLOPs (C = 6ND): "
            f"N = {n.value:.3g} {_interval(n, '.3g')}, D = {d.value:.3g} {_interval(d, '.3g')}, "
            f"L = {loss.value:.4f} {_interval(loss, '.4f')}"
        )
    else:
        out.append("compute-optimal allocation: L(N) does not model D (every run saw the "
                   "same tokens); fit runs that differ in D too")  # fmt: skip
    if study.left_out:
        left = study.left_out
        out.append(f"left out ({len(left)} not finished): {left_out_text(left)}")
    return "\n".join(out) + "\n"


def study_json(study: Study) -> dict[str, Any]:
    """``slmkit scaling --json``: the law, parameters, points, prediction, allocation."""
    fit = study.fit
    prediction, allocation = study.prediction(), study.allocation()
    h = study.held_out
    points = [{"run_id": p.run_id, "N": p.n, "D": p.d, "val_loss": p.loss,
               "fit": float(fit.predict(p.n, p.d)[0])} for p in study.points]  # fmt: skip
    held_out = None
    if h is not None and prediction is not None:
        held_out = {"run_id": h.run_id, "N": h.n, "D": h.d, "val_loss": h.loss,
                    "predicted": prediction.as_json(),
                    "error": h.loss - prediction.value}  # fmt: skip
    return {
        "law": fit.law.name,
        "formula": fit.law.formula,
        "parameters": {name: e.as_json() for name, e in fit.parameters().items()},
        "level": LEVEL,
        "resamples": fit.resamples,
        "failed_resamples": fit.failed_resamples,
        "huber_delta": HUBER_DELTA,
        "huber_loss": fit.huber_loss,
        "points": points,
        "held_out": held_out,
        "allocation": None
        if allocation is None
        else {"flops": study.budget, **{k: e.as_json() for k, e in allocation.items()}},
        "left_out": [{"run_id": r.run_id, "why": r.why} for r in study.left_out],
    }


# -- the picture -----------------------------------------------------------------------------


@attrs.define(frozen=True)
class FitCurve:
    """One fitted curve of the picture: at fixed tokens ``D``, or along a budget ``C``."""

    label: str
    members: list[RunPoint]
    tokens: float = 0.0
    #: FLOPs: the isoFLOP curve ``D = C / 6N``
    flops: float = 0.0

    def d(self, n: Any) -> Any:
        """``D`` at each ``N`` along the curve."""
        return self.flops / (6 * n) if self.flops else np.full_like(n, self.tokens)


def curves(study: Study) -> list[FitCurve]:
    """The fitted curves to draw, each with the runs on it.

    One curve per number of tokens seen; for ``L(N, D)`` fitted to runs that each had a
    ``training.max_flops`` budget, one isoFLOP curve per budget instead (``D = C / 6N``).
    """
    by_budget = all(p.max_flops > 0 for p in study.points) and study.fit.law is LAW_ND
    groups: dict[float, list[RunPoint]] = {}
    for p in study.points:
        groups.setdefault(p.max_flops if by_budget else float(p.d), []).append(p)
    if by_budget:
        return [FitCurve(f"C = {c:.3g} FLOPs", members, flops=c)
                for c, members in sorted(groups.items())]  # fmt: skip
    return [FitCurve(f"D = {d:,.0f} tokens", members, tokens=d)
            for d, members in sorted(groups.items())]  # fmt: skip


def study_figure(study: Study) -> Figure:
    """Loss against N, both logarithmic: the runs, the fit, its band, the held-out run."""
    try:
        import matplotlib
    except ImportError:
        raise SlmkitError(
            "the scaling picture needs matplotlib: pip install 'slmkit[plot]' "
            "(or uv sync --extra plot)"
        ) from None
    matplotlib.use("Agg")  # draw to memory: no display needed
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fit, held = study.fit, study.held_out
    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    axes = figure.subplots()
    sizes = [p.n for p in study.points] + ([held.n] if held else [])
    grid = np.geomspace(min(sizes) / 1.5, max(sizes) * 1.5, 200)
    for i, curve in enumerate(curves(study)):
        color = f"C{i % 10}"
        low, high = fit.band(grid, curve.d(grid))
        axes.fill_between(grid, low, high, color=color, alpha=0.2, linewidth=0)
        axes.plot(grid, fit.predict(grid, curve.d(grid)), color=color,
                  label=f"fit at {curve.label}, {LEVEL:.0%} band")  # fmt: skip
        axes.plot([p.n for p in curve.members], [p.loss for p in curve.members], "o",
                  color=color, label=f"runs ({len(curve.members)})")  # fmt: skip
    prediction = study.prediction()
    if held is not None and prediction is not None:
        error = [[prediction.value - prediction.low], [prediction.high - prediction.value]]
        axes.errorbar([held.n], [prediction.value], yerr=error, fmt="_", color="black",
                      markersize=14, capsize=5, label="held out: predicted")  # fmt: skip
        axes.plot([held.n], [held.loss], "*", color="black", markersize=12,
                  label=f"held out: measured ({held.loss - prediction.value:+.3f})")  # fmt: skip
    e = fit.parameters()["E"].value
    axes.axhline(e, color="gray", linestyle=":", linewidth=1, label=f"E = {e:.3f}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 1)))
    axes.set_xlabel("non-embedding parameters N")
    axes.set_ylabel("final validation loss (nats/token)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    values = ", ".join(f"{k} = {v.value:.3g}" for k, v in fit.parameters().items())
    axes.set_title(f"{fit.law.formula}\n{values}", fontsize="medium")
    return figure


def study_png(study: Study) -> bytes:
    """The picture as PNG bytes."""
    buffer = io.BytesIO()
    study_figure(study).savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()


# -- the report ------------------------------------------------------------------------------


def _html_table(rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows[1:])  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
pre { background: #f7f7f7; padding: 0.8em; white-space: pre-wrap; }
img { max-width: 100%; }
"""


def report_html(study: Study, png: bytes, sources: Sequence[Path]) -> str:
    """One self-contained HTML page: the fit's text, its picture, where the runs were."""
    image = base64.b64encode(png).decode("ascii")
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"slmkit scaling: {study.fit.law.formula}"
    rows = [["PARAMETER", "VALUE", "LOW", "HIGH"]]
    rows += [[k, f"{e.value:.4g}", f"{e.low:.4g}", f"{e.high:.4g}"]
             for k, e in study.fit.parameters().items()]  # fmt: skip
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Made {made} from {", ".join(html.escape(str(s)) for s in sources)}.</p>
<h2>Parameters ({LEVEL:.0%} bootstrap intervals over runs)</h2>
{_html_table(rows)}
<h2>Fit</h2>
<img alt="final validation loss against non-embedding parameters, the fit and its band"
 src="data:image/png;base64,{image}">
<pre>{html.escape(study_text(study))}</pre>
</body></html>
"""


def check_output(path: Path) -> None:
    """Refuse, before anything is computed, a file that could not be written."""
    if not path.parent.is_dir():
        raise SlmkitError(f"{path}: no such folder {path.parent}")
    if path.is_dir() or path.name in ("", ".", ".."):
        raise SlmkitError(f"{path}: is a folder; name the file to write")


def write_output(path: Path, data: bytes) -> None:
    """Write one output atomically; a failure is one line naming the file."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise SlmkitError(f"{path}: cannot write: {exc.strerror or exc}") from None


# -- the command -----------------------------------------------------------------------------


def gather(names: Sequence[str], sweep: str | None, runs_dir: str) -> list[RunRecord]:
    """The named runs, then every run of ``sweep`` (in sweep order); at least one."""
    records = [read_run(resolve_run(name, runs_dir)) for name in names]
    if sweep:
        swept = list_runs(runs_dir, sweep=sweep)
        if not swept:
            raise SlmkitError(f"--sweep {sweep}: no runs of that sweep in {runs_dir}")
        records += sorted(swept, key=lambda r: (r.sweep or {}).get("index", 0))
    if not records:
        raise SlmkitError("scaling: name the runs (folders or ids), or --sweep ID")
    unique = {r.run_dir.resolve(): r for r in records}  # a run named twice is one point
    return list(unique.values())


def scaling_command(args: argparse.Namespace) -> int:
    """``slmkit scaling``: fit, print, and write the picture and report asked for."""
    outputs = [Path(p) for p in (args.out, args.png) if p]
    for path in outputs:
        check_output(path)
    records = gather(args.runs, args.sweep, args.runs_dir)
    held = read_run(resolve_run(args.leave_out, args.runs_dir)) if args.leave_out else None
    study = fit_runs(records, leave_out=held, budget=args.budget, resamples=args.resamples,
                     seed=args.seed)  # fmt: skip
    png = study_png(study) if outputs else b""
    files = []
    if args.png:
        files.append((Path(args.png), png))
    if args.out:
        sources = sorted({r.run_dir.parent for r in records})
        files.append((Path(args.out), report_html(study, png, sources).encode("utf-8")))
    print(json.dumps(study_json(study), indent=2) if args.json else study_text(study), end="")
    if args.json:
        print()
    for path, data in files:
        write_output(path, data)
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0
