"""``slmkit scaling``: a scaling law fitted to runs, printed, drawn and reported.

The runs (named, or a sweep's) are fitted by :func:`slmkit.scaling_runs.fit_runs`:
``L(N)``, or ``L(N, D)`` when they saw different numbers of tokens. The command prints
each parameter with its bootstrap interval, the points and their residuals, a held-out
run's prediction against its measured loss, and the compute-optimal allocation for a
budget; it can write the log-log picture (:mod:`slmkit.scaling_plot`) and a
self-contained HTML report. Every check is made and everything computed before the first
file is written, and each file is written atomically, so a refusal writes nothing.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slmkit.report_files import STYLE, check_output, html_table, write_output
from slmkit.runs import gather_runs, read_run, resolve_run
from slmkit.scaling import HUBER_DELTA, LEVEL, Estimate
from slmkit.scaling_plot import study_png
from slmkit.scaling_runs import Study, fit_runs, left_out_text
from slmkit.table import format_table

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
        out.append(f"left out ({len(left)}): {left_out_text(left)}")
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


# -- the report ------------------------------------------------------------------------------


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
<style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Made {made} from {", ".join(html.escape(str(s)) for s in sources)}.</p>
<h2>Parameters ({LEVEL:.0%} bootstrap intervals over runs)</h2>
{html_table(rows)}
<h2>Fit</h2>
<img alt="final validation loss against non-embedding parameters, the fit and its band"
 src="data:image/png;base64,{image}">
<pre>{html.escape(study_text(study))}</pre>
</body></html>
"""


# -- the command -----------------------------------------------------------------------------


def scaling_command(args: argparse.Namespace) -> int:
    """``slmkit scaling``: fit, print, and write the picture and report asked for."""
    outputs = [Path(p) for p in (args.out, args.png) if p]
    for path in outputs:
        check_output(path)
    records = gather_runs(args.runs, [args.sweep] if args.sweep else [], args.runs_dir,
                          "scaling: name the runs (folders or ids), or --sweep ID")  # fmt: skip
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
