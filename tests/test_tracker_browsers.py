"""A sweep in the trackers' own dashboards: TensorBoard and trackio served on 127.0.0.1, their
data read back through their HTTP APIs, their pages drawn by headless Chromium.

The runs are real: ``slmkit run`` trains a sweep of two learning rates of a tiny model with
the ``tensorboard`` and ``trackio`` trackers enabled, in a process of its own (trackio's
store and the home folder in a temporary folder, the Hugging Face libraries offline). Every
check compares what a dashboard serves or draws with the runs' own ``log.jsonl``.

``SLMKIT_DOCS_IMAGES=1 uv run pytest -m slow tests/test_tracker_browsers.py`` also copies
the screenshots to ``docs/images/tensorboard.png`` and ``docs/images/trackio.png`` (the
pictures of docs/trackers.md).
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
import pytest
import tomli_w
from browser_checks import (
    HOST,
    OFFLINE,
    Box,
    Page,
    check_not_blank,
    chromium,
    colour_pixels,
    free_port,
    get_json,
    headless_page,
    local_server,
    pixels,
    post_json,
)
from conftest import ROOT, TINY, merge, run_cli
from PIL import Image

import slmkit
from slmkit.runlog import read_events

pytestmark = pytest.mark.slow

#: the sweep: one run per learning rate, long enough for the curves to look like curves
LEARNING_RATES = (0.003, 0.001)
EXPERIMENT = merge(TINY, {
    "experiment": {"name": "tiny-sweep", "seed": 7},
    "training": {"max_steps": 40, "eval_every": 5, "checkpoint_every": 40, "log_every": 1},
    "sampling": {"every": 20, "max_new_tokens": 24},
    "trackers": [{"name": "tensorboard"}, {"name": "trackio"}],
})  # fmt: skip
#: the tags both pages show: the curves checked (a regular expression, as both take one)
SHOWN_TAGS = ("train/loss", "val/loss")
TAG_FILTER = r"^(train|val)/loss$"
#: pixels of a run's colour each chart of a screenshot shows at least: measured with this
#: sweep, TensorBoard 421 to 1,085 a run and chart, trackio 509 to 1,362; a chart without
#: the run's curve has none
MIN_CURVE_PIXELS = 250
#: TensorBoard's settings, as it keeps them in the browser's local storage: the settings
#: pane closed, no data table under the charts (the runs table has the learning rate), the
#: whole range of each curve shown, wide cards
TENSORBOARD_SETTINGS = {
    "timeSeriesSettingsPaneOpened": False,
    "stepSelectorEnabled": False,
    "ignoreOutliers": False,
    "timeSeriesCardMinWidth": 480,
    "sideBarWidthInPercent": 26,
    "dashboardDisplayedHparamColumns": [{
        "type": "HPARAM", "name": "optimizer.learning_rate",
        "displayName": "optimizer.learning_rate", "enabled": True, "removable": True,
        "sortable": True, "movable": True, "filterable": True,
    }],
}  # fmt: skip


@dataclass(frozen=True)
class LoggedRun:
    """One run as its own ``log.jsonl`` holds it: what each dashboard must show."""

    run_id: str
    learning_rate: float
    #: ``(step, value)`` of each shown tag, from the ``train_step`` and ``eval`` events
    curves: dict[str, list[tuple[int, float]]]
    #: ``(step, prompt + continuation)`` of each ``sample`` event
    samples: list[tuple[int, str]]
    #: every scalar tag the trackers record of the log (``slmkit.tracked_values``)
    scalar_tags: set[str]
    final_val_loss: float

    @classmethod
    def read(cls, run_dir: Path) -> LoggedRun:
        """The run in ``run_dir``."""
        log = read_events(run_dir / "log.jsonl")
        experiment = tomllib.loads((run_dir / "experiment.toml").read_text(encoding="utf-8"))
        by_event: dict[str, list[dict[str, Any]]] = {}
        for event in log:
            by_event.setdefault(event["event"], []).append(event)
        tracked = [slmkit.tracked_values(event) for event in log]
        (end,) = by_event["run_end"]
        return cls(
            run_id=run_dir.name,
            learning_rate=experiment["optimizer"]["learning_rate"],
            curves={
                "train/loss": [(e["step"], e["train_loss"]) for e in by_event["train_step"]],
                "val/loss": [(e["step"], e["val_loss"]) for e in by_event["eval"]],
            },
            samples=[(e["step"], e["prompt"] + e["sample_text"]) for e in by_event["sample"]],
            scalar_tags={tag for values in tracked if values for tag in values.scalars},
            final_val_loss=end["summary"]["val_loss"],
        )


@dataclass(frozen=True)
class Sweep:
    """The sweep the dashboards show: its runs, where they are, and trackio's store."""

    runs_dir: Path
    trackio_store: Path
    project: str
    runs: list[LoggedRun]


def offline_env(store: Path, home: Path) -> dict[str, str]:
    """trackio's store in ``store``, the Hugging Face libraries offline, and ``home`` as the
    home folder (each test checks that nothing was written there)."""
    return {**os.environ, **OFFLINE, "TRACKIO_DIR": str(store), "HOME": str(home),
            "HF_HOME": str(store.parent / "hf")}  # fmt: skip


def nothing_in(home: Path) -> list[str]:
    """What was written to the home folder ``home`` (nothing may be)."""
    return sorted(str(path.relative_to(home)) for path in home.rglob("*"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """The two runs of the sweep, trained by ``slmkit run --sweep`` with both trackers."""
    folder = tmp_path_factory.mktemp("sweep")
    experiment, runs_dir = folder / "tiny-sweep.toml", folder / "runs"
    experiment.write_text(tomli_w.dumps(EXPERIMENT), encoding="utf-8")
    store, home = folder / "trackio", folder / "home"
    home.mkdir()
    rates = ",".join(str(rate) for rate in LEARNING_RATES)
    done = run_cli("run", str(experiment), "--runs-dir", str(runs_dir), "--threads", "1",
                   "--sweep", f"optimizer.learning_rate={rates}", cwd=folder,
                   env=offline_env(store, home))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert nothing_in(home) == []
    runs = [LoggedRun.read(path) for path in sorted(runs_dir.iterdir()) if path.is_dir()]
    assert sorted(run.learning_rate for run in runs) == sorted(LEARNING_RATES)
    for run in runs:  # what the checks below rely on
        assert [step for step, _ in run.curves["train/loss"]] == list(range(1, 41))
        assert [step for step, _ in run.curves["val/loss"]] == list(range(5, 41, 5))
        assert [step for step, _ in run.samples] == [20, 40]
        assert run.scalar_tags == {
            "train/loss", "train/lr", "train/tokens_per_s", "val/loss", "val/bpc",
            "final/train_loss", "final/val_loss", "final/best_val_loss", "final/val_bpc",
        }  # fmt: skip
    return Sweep(runs_dir, store, str(EXPERIMENT["experiment"]["name"]), runs)


def keep_for_docs(picture: Path, name: str) -> None:
    """With ``SLMKIT_DOCS_IMAGES=1``, copy the screenshot to ``docs/images/NAME``, less the
    empty bottom of the page (the rows within 16 a channel of its last row, shadows allowed)
    but for a margin."""
    if os.environ.get("SLMKIT_DOCS_IMAGES") != "1":
        return
    rgb = pixels(picture)
    content = np.flatnonzero(np.abs(rgb - rgb[-1]).max(axis=(1, 2)) > 16)
    height = min(len(rgb), int(content[-1]) + 1 + 24) if len(content) else len(rgb)
    with Image.open(picture) as image:
        image.crop((0, 0, image.width, height)).save(ROOT / "docs" / "images" / name)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f}s"
        time.sleep(0.25)


def check_charts_show_each_run(
    picture: Path, charts: list[Box], colours: dict[str, tuple[int, int, int]]
) -> None:
    """The screenshot shows a chart per shown tag, each with every run's curve: at least
    :data:`MIN_CURVE_PIXELS` pixels of the run's colour inside the chart."""
    assert len(charts) == len(SHOWN_TAGS), charts
    drawn = {(chart, run_id): colour_pixels(picture, colour, chart)
             for chart in charts for run_id, colour in colours.items()}  # fmt: skip
    assert min(drawn.values()) >= MIN_CURVE_PIXELS, drawn


# -- TensorBoard ---------------------------------------------------------------------------

#: every curve TensorBoard's time series page draws (as SVG): its stroke colour and path
TENSORBOARD_CURVES = """Array.from(document.querySelectorAll('path'))
  .filter(p => p.style.fill === 'none' && p.style.opacity === '1'
               && p.style.stroke.startsWith('rgb') && p.getAttribute('d').startsWith('M'))
  .map(p => [p.style.stroke, p.getAttribute('d')])"""

#: each row of its runs table: the run's name, the hparams column, the run's colour
TENSORBOARD_RUNS_TABLE = """Array.from(document.querySelectorAll('tb-data-table-content-row'))
  .map(row => [...Array.from(row.querySelectorAll('tb-data-table-content-cell'))
                 .map(cell => cell.innerText.trim()).filter(text => text),
               row.querySelector('.run-color-swatch').style.background])"""


def path_points(path: str) -> np.ndarray:
    """The ``(x, y)`` points of an SVG path of straight lines (``M x,y L x,y ...``)."""
    return np.array([[float(v) for v in point.split(",")] for point in re.split("[ML]", path)[1:]])


def drawn_from(points: np.ndarray, series: list[tuple[int, float]]) -> bool:
    """Whether ``points`` are ``series`` drawn: a point per step, x growing with the step and
    y falling with the value, each linearly (a chart's axes), to a hundredth of a pixel."""
    if len(points) != len(series):
        return False
    data = np.array(series, dtype=np.float64)
    for axis, sign in ((0, 1), (1, -1)):
        slope, offset = np.polyfit(data[:, axis], points[:, axis], 1)
        off = np.abs(slope * data[:, axis] + offset - points[:, axis]).max()
        if sign * slope <= 0 or off > 0.01:
            return False
    return True


def check_tensorboard_curves(curves: list[list[str]], runs: list[LoggedRun]) -> dict[str, str]:
    """Each drawn curve is one run's tag, every shown tag of every run is drawn once, and a
    run's curves share one colour, its own; the colour of each run."""
    drawn: dict[tuple[str, str], str] = {}
    for colour, path in curves:
        points = path_points(path)
        (match,) = [(run.run_id, tag) for run in runs for tag in SHOWN_TAGS
                    if drawn_from(points, run.curves[tag])]  # fmt: skip
        assert match not in drawn, f"{match} drawn twice"
        drawn[match] = colour
    assert set(drawn) == {(run.run_id, tag) for run in runs for tag in SHOWN_TAGS}
    colours = {}
    for run in runs:
        (colours[run.run_id],) = {drawn[run.run_id, tag] for tag in SHOWN_TAGS}
    assert len(set(colours.values())) == len(runs)
    return colours


def rgb(css: str) -> tuple[int, int, int]:
    """``rgb(r, g, b)`` as a tuple."""
    r, g, b = (int(v) for v in re.findall(r"\d+", css)[:3])
    return r, g, b


def test_tensorboard_serves_and_draws_the_sweeps_runs(sweep: Sweep, tmp_path: Path) -> None:
    chromium()  # fails at once, naming the package, where it is missing
    home = tmp_path / "home"
    home.mkdir()
    names = {run.run_id: f"{run.run_id}/tensorboard" for run in sweep.runs}  # its folder
    port = free_port()
    base = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep.runs_dir),
               "--host", HOST, "--port", str(port)]  # fmt: skip
    env = {"HOME": str(home), "TMPDIR": str(tmp_path)}
    with local_server(command, f"{base}/data/runs", tmp_path / "tensorboard.log", env):
        # TensorBoard loads event files in the background: the tags come when they are read
        def all_scalars_read() -> bool:
            served = get_json(f"{base}/data/plugin/scalars/tags")
            return all(set(served.get(names[r.run_id], {})) == r.scalar_tags for r in sweep.runs)

        wait_for(all_scalars_read, "TensorBoard listing every scalar the runs logged")
        assert sorted(get_json(f"{base}/data/runs")) == sorted(names.values())
        for run in sweep.runs:
            for tag in SHOWN_TAGS:
                query = urlencode({"run": names[run.run_id], "tag": tag})
                served = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
                assert [step for _, step, _ in served] == [step for step, _ in run.curves[tag]]
                assert [v for _, _, v in served] == pytest.approx(  # stored as float32
                    [v for _, v in run.curves[tag]], rel=1e-6
                )
        wait_for(lambda: len(get_json(f"{base}/data/plugin/text/tags")) == len(sweep.runs),
                 "TensorBoard listing the runs' samples")  # fmt: skip
        assert get_json(f"{base}/data/plugin/text/tags") == {
            name: ["sample/text_summary"] for name in names.values()
        }
        for run in sweep.runs:
            query = urlencode({"run": names[run.run_id], "tag": "sample/text_summary"})
            served = get_json(f"{base}/data/plugin/text/text?{query}")
            assert [entry["step"] for entry in served] == [step for step, _ in run.samples]
            for entry, (_, text) in zip(served, run.samples, strict=True):
                # a code block, rendered as HTML (its tabs expanded): the same characters
                (code,) = re.findall(r"<pre><code>(.*?)</code></pre>", entry["text"], re.S)
                assert html.unescape(code).split() == text.split()
        # the hparams each run wrote when it ended: its experiment and final metrics
        groups = post_json(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                "STATUS_RUNNING"],
        })["sessionGroups"]  # fmt: skip
        assert {
            group["name"]: (group["hparams"]["optimizer.learning_rate"],
                            {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
                            ["final/val_loss"])
            for group in groups
        } == {
            names[run.run_id]: (run.learning_rate, pytest.approx(run.final_val_loss, rel=1e-6))
            for run in sweep.runs
        }  # fmt: skip

        # The time series page, its charts as SVG (TensorBoard's own `forceSVG` flag) rather
        # than WebGL, whose frames headless Chromium shows only some of the time; only the
        # shown tags (its tag filter), unsmoothed. Polled until every curve is drawn.
        page_url = (f"{base}/?forceSVG=true&smoothing=0&tagFilter={quote(TAG_FILTER)}"
                    "#timeseries")  # fmt: skip
        counts = sorted(len(run.curves[tag]) for run in sweep.runs for tag in SHOWN_TAGS)
        with headless_page(tmp_path / "chromium", tmp_path / "chromium.log") as page:
            page.open(page_url, {"_tb_global_settings": json.dumps(TENSORBOARD_SETTINGS)})
            curves = page.wait_for(
                TENSORBOARD_CURVES, "TensorBoard drawing every curve",
                ready=lambda drawn: sorted(d.count("L") + 1 for _, d in drawn) == counts,
            )  # fmt: skip
            colours = check_tensorboard_curves(curves, sweep.runs)
            # its runs table: each run, the learning rate its hparams hold, its curves' colour
            assert sorted(page.evaluate(TENSORBOARD_RUNS_TABLE)) == sorted(
                [names[run.run_id], str(run.learning_rate), colours[run.run_id]]
                for run in sweep.runs
            )
            cards = [box for box in page.boxes("card-view") if box[0] < box[2] and box[1] < box[3]]
            picture = page.screenshot(tmp_path / "tensorboard.png")
    check_not_blank(picture)
    check_charts_show_each_run(picture, cards, {r: rgb(c) for r, c in colours.items()})
    assert nothing_in(home) == []
    keep_for_docs(picture, "tensorboard.png")


# -- trackio -------------------------------------------------------------------------------

#: the runs in trackio's sidebar once grouped: each run's group (its learning rate), its
#: name and its colour
TRACKIO_RUN_GROUPS = """Array.from(document.querySelectorAll('.run-group-section'))
  .flatMap(group => Array.from(group.querySelectorAll('.checkbox-item')).map(item => [
    group.querySelector('.run-group-label').title, item.querySelector('.run-name').title,
    item.querySelector('.color-dot').style.background]))"""
#: trackio's "Group by" menu opened, then its option ``optimizer.learning_rate`` chosen
TRACKIO_GROUP_BY_MENU = "document.querySelector('input[aria-label=\"Group by\"]').focus()"
TRACKIO_GROUP_BY_RATE = """(option => {
  if (option) option.dispatchEvent(new MouseEvent('mousedown', {bubbles: true}));
  return !!option;
})(Array.from(document.querySelectorAll('[role=option]'))
     .find(o => o.textContent.trim().endsWith('optimizer.learning_rate')))"""


def trackio_canvas_pixels(colours: list[tuple[int, int, int]]) -> str:
    """A script: for each of trackio's charts (canvases), how many of its pixels are each of
    ``colours`` (within 24 a channel)."""
    return f"""(colours => Array.from(document.querySelectorAll('.vega-embed canvas')).map(c => {{
  const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  return colours.map(([r, g, b]) => {{
    let n = 0;
    for (let i = 0; i < data.length; i += 4) {{
      if (Math.abs(data[i] - r) <= 24 && Math.abs(data[i + 1] - g) <= 24
          && Math.abs(data[i + 2] - b) <= 24) n++;
    }}
    return n;
  }});
}}))({json.dumps(colours)})"""


def test_trackio_serves_and_draws_the_sweeps_runs(sweep: Sweep, tmp_path: Path) -> None:
    chromium()
    home = tmp_path / "home"
    home.mkdir()
    project, run_ids = sweep.project, sorted(run.run_id for run in sweep.runs)
    port = free_port()
    base = f"http://{HOST}:{port}"
    serve = (
        "import sys, trackio; trackio.show(project=sys.argv[1], open_browser=False, "
        "host=sys.argv[2], server_port=int(sys.argv[3]), share=False, block_thread=True)"
    )
    command = [sys.executable, "-c", serve, project, HOST, str(port)]
    with local_server(command, f"{base}/version", tmp_path / "trackio.log",
                      offline_env(sweep.trackio_store, home)):  # fmt: skip
        api = f"{base}/api"
        # one project, named by the experiment; one trackio run per run, named by its id
        assert post_json(f"{api}/get_all_projects", {})["data"] == [project]
        listed = post_json(f"{api}/get_runs_for_project", {"project": project})["data"]
        assert sorted(run["name"] for run in listed) == run_ids
        # each run's config: its resolved experiment, as dotted keys
        configs = post_json(f"{api}/get_run_configs", {"project": project})["data"]
        assert {run["name"]: configs[run["id"]]["optimizer.learning_rate"] for run in listed} == {
            run.run_id: run.learning_rate for run in sweep.runs
        }
        for run in sweep.runs:
            query = {"project": project, "run": run.run_id}
            metrics = post_json(f"{api}/get_metrics_for_run", query)["data"]
            assert set(metrics) == run.scalar_tags | {"sample"}
            for tag in SHOWN_TAGS:
                served = post_json(f"{api}/get_metric_values", {**query, "metric_name": tag})
                assert [(p["step"], p["value"]) for p in served["data"]] == run.curves[tag]
            # the samples: Markdown code blocks of what the run logged, as the tracker wrote
            entries = post_json(f"{api}/get_logs", query)["data"]
            samples = [(e["step"], e["sample"]) for e in entries if "sample" in e]
            assert [(step, s["_type"]) for step, s in samples] == [
                (step, "trackio.markdown") for step, _ in run.samples
            ]
            for (_, served_sample), (_, text) in zip(samples, run.samples, strict=True):
                lines = served_sample["_value"].split("\n")
                assert "\n".join(line.removeprefix("    ") for line in lines) == text

        # The dashboard, unsmoothed, only the shown tags (its metric filter), section headers
        # hidden, the runs grouped by learning rate; polled until each chart shows every run.
        shown = {"project": project, "smoothing": "0", "metric_filter": TAG_FILTER,
                 "accordion": "hidden"}  # fmt: skip
        page_url = f"{base}/?{urlencode(shown)}"
        with headless_page(tmp_path / "chromium", tmp_path / "chromium.log") as page:
            page.open(page_url)
            group_by(page)
            expected = sorted([str(run.learning_rate), run.run_id] for run in sweep.runs)
            groups = page.wait_for(
                TRACKIO_RUN_GROUPS, "trackio grouping the runs by learning rate",
                ready=lambda listed: sorted(row[:2] for row in listed) == expected,
            )  # fmt: skip
            colours = {run_id: rgb(colour) for _, run_id, colour in groups}
            assert len(set(colours.values())) == len(sweep.runs)
            page.wait_for(
                trackio_canvas_pixels(list(colours.values())),
                "trackio drawing each run's curve on both charts",
                ready=lambda counts: len(counts) == len(SHOWN_TAGS)
                and all(n >= MIN_CURVE_PIXELS for chart in counts for n in chart),
            )  # fmt: skip
            charts = page.boxes(".vega-embed")
            picture = page.screenshot(tmp_path / "trackio.png")
    check_not_blank(picture)
    check_charts_show_each_run(picture, charts, colours)
    assert nothing_in(home) == []
    keep_for_docs(picture, "trackio.png")


def group_by(page: Page) -> None:
    """Group trackio's runs by ``optimizer.learning_rate`` (its sidebar's "Group by")."""

    def chosen(loaded: Any) -> bool:  # the menu's options come once the runs' configs do
        page.evaluate(TRACKIO_GROUP_BY_MENU)
        return bool(loaded and page.evaluate(TRACKIO_GROUP_BY_RATE))

    page.wait_for("document.readyState === 'complete'", "trackio's Group by menu", ready=chosen)
