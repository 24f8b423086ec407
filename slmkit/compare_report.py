"""The HTML report and the picture files of ``slmkit compare``, written whole or not at all.

The report is one self-contained page: the tables of :mod:`slmkit.compare` and of the groups
of seeds (:mod:`slmkit.seed_stats`), the loss-curve PNG embedded (base64), the probes PNG
(:mod:`slmkit.probe_figure`) when runs logged probe metrics, each run's latest sample. Every
file is drawn before any is written, and each is written atomically.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from slmkit.compare import (
    PROBES_HEADING,
    config_diff_rows,
    environment_diff_rows,
    loss_curves_png,
    metric_rows,
    probe_rows,
)
from slmkit.errors import SlmkitError
from slmkit.probe_figure import has_probes
from slmkit.probe_figure import probes_png as probes_png_bytes
from slmkit.report_files import STYLE, check_output, html_table, write_output
from slmkit.runs import RunRecord
from slmkit.seed_stats import (
    INTERVAL,
    SeedAnalysis,
    comparison_heading,
    comparison_rows,
    group_rows,
    notes,
)


def seed_html(analysis: SeedAnalysis) -> str:
    """The groups of seeds: their table, the comparisons with the baseline, the notes."""
    parts = [f"<p>Runs whose experiments differ only in their seed form a group; {INTERVAL}: "
             "the t-interval of the group's mean.</p>"]  # fmt: skip
    if analysis.groups:
        parts.append(html_table(group_rows(analysis)))
    if analysis.comparisons:
        parts.append(f"<p>{html.escape(comparison_heading(analysis))}</p>")
        parts.append(html_table(comparison_rows(analysis)))
    parts += [f"<p>{html.escape(line)}</p>" for line in notes(analysis)]
    return "\n".join(parts)


def probes_html(records: Sequence[RunRecord], png: bytes | None) -> str:
    """The Probes section: the picture and the latest values; empty without probe metrics."""
    if png is None:
        return ""
    image = base64.b64encode(png).decode("ascii")
    return (f"<h2>Probes</h2>\n<p>{html.escape(PROBES_HEADING)}; see docs/probes.md.</p>\n"
            f"{html_table(probe_rows(records))}\n"
            f'<img alt="probe metrics over training and each head at the latest evaluation" '
            f'src="data:image/png;base64,{image}">\n')  # fmt: skip


def report_html(
    records: Sequence[RunRecord], png: bytes, analysis: SeedAnalysis, probes: bytes | None = None
) -> str:
    """One self-contained HTML page: metrics, groups of seeds, config differences, curves,
    the probes (``probes``: their picture, None when no run logged any), samples."""
    diff = config_diff_rows(records)
    image = base64.b64encode(png).decode("ascii")
    samples = "".join(
        f"<h3>{html.escape(r.run_id)}</h3>"
        + (f"<pre>{html.escape(r.last_sample)}</pre>" if r.last_sample else "<p>(no sample)</p>")
        for r in records
    )
    diff_html = html_table(diff) if len(diff) > 1 else "<p>The experiments are identical.</p>"
    env = environment_diff_rows(records)
    env_html = (
        html_table(env) if len(env) > 1 else "<p>The recorded environments are identical.</p>"
    )
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"slmkit compare: {len(records)} runs"
    curves = "each group's mean" if analysis.replicated else "each run's"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Made {made} from {", ".join(html.escape(str(r.run_dir)) for r in records)}.</p>
<h2>Metrics</h2>
{html_table(metric_rows(records))}
<h2>Groups of seeds</h2>
{seed_html(analysis)}
<h2>Config differences</h2>
{diff_html}
<h2>Environment differences</h2>
{env_html}
<h2>Loss curves</h2>
<img alt="{curves} training and validation loss" src="data:image/png;base64,{image}">
{probes_html(records, probes)}<h2>Latest samples</h2>
{samples}
</body></html>
"""


def write_outputs(
    records: Sequence[RunRecord],
    analysis: SeedAnalysis,
    *,
    report: Path | None,
    png: Path | None,
    probes_png: Path | None = None,
) -> list[Path]:
    """Draw each picture once and write the report and/or the PNGs; the paths written.

    ``probes_png`` of runs that logged no probe metrics is an error (nothing is written);
    the report then has no Probes section.
    """
    if report is None and png is None and probes_png is None:
        return []
    if probes_png is not None and not has_probes(records):
        raise SlmkitError(f"--probes-png {probes_png}: none of the runs logged probe metrics "
                          "(an experiment's [[probes]] tables make them)")  # fmt: skip
    for path in (report, png, probes_png):
        if path is not None:
            check_output(path)
    picture = loss_curves_png(records, analysis) if report or png else b""
    probes = probes_png_bytes(records) if has_probes(records) and (report or probes_png) else None
    page = report_html(records, picture, analysis, probes).encode("utf-8") if report else b""
    written = []
    for path, data in ((png, picture), (probes_png, probes)):
        if path is not None and data is not None:
            write_output(path, data)
            written.append(path)
    if report is not None:
        write_output(report, page)
        written.append(report)
    return written
