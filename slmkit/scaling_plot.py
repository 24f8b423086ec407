"""The picture of a scaling study: final loss against ``N``, both axes logarithmic, with the
runs, the fitted curve, its bootstrap band and the held-out run. Needs matplotlib, the
optional extra ``slmkit[plot]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from slmkit.pictures import figure_class, png_bytes
from slmkit.scaling import LAW_ND, LEVEL
from slmkit.scaling_runs import RunPoint, Study

if TYPE_CHECKING:  # matplotlib is an optional extra, imported when a picture is drawn
    from matplotlib.figure import Figure

#: the picture's size: inches x dpi = pixels
FIGURE_INCHES = (8.0, 5.5)
FIGURE_DPI = 100


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
    Figure = figure_class("scaling picture")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

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
    # The losses set the view, not E: a fit with no floor in sight puts E far below them.
    shown = [p.loss for p in study.points]
    if held is not None and prediction is not None:
        shown += [held.loss, prediction.low, prediction.high]
    bottom, top = min(shown) / 1.05, max(shown) * 1.05
    e = fit.parameters()["E"].value
    if e >= bottom:
        axes.axhline(e, color="gray", linestyle=":", linewidth=1, label=f"E = {e:.3f}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_ylim(bottom, top)
    # a few plain ticks: the losses span less than a decade, where log ticks say little
    axes.set_yticks(np.unique(np.round(np.geomspace(bottom, top, 7), 2)))
    axes.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("non-embedding parameters N")
    axes.set_ylabel("final validation loss (nats/token)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    values = ", ".join(f"{k} = {v.value:.3g}" for k, v in fit.parameters().items())
    axes.set_title(f"{fit.law.formula}\n{values}", fontsize="medium")
    return figure


def study_png(study: Study) -> bytes:
    """The picture as PNG bytes."""
    return png_bytes(study_figure(study), FIGURE_DPI)
