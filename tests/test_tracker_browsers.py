"""A run in the trackers' own dashboards: TensorBoard and trackio served on 127.0.0.1, their
data read back through their HTTP APIs, their pages drawn by headless Chromium.

``write_tensorboard_run`` and ``write_trackio_run`` make the run each dashboard shows; each
returns what it logged, which is all the checks compare against, so either can be
replaced by a real slmkit run through its tracker without touching the checks.

``SLMKIT_DOCS_IMAGES=1 uv run pytest -m slow tests/test_tracker_browsers.py`` also copies
the screenshots to ``docs/images/tensorboard.png`` and ``docs/images/trackio.png``.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import pytest
from browser_checks import (
    HOST,
    OFFLINE,
    check_not_blank,
    chromium,
    colour_pixels,
    free_port,
    get_json,
    local_server,
    page_dom,
    post_json,
    screenshot,
)
from conftest import ROOT

pytestmark = pytest.mark.slow

#: the colour each dashboard gives its first run: TensorBoard's #425066, trackio's #A8769B
TENSORBOARD_RUN_COLOUR = (0x42, 0x50, 0x66)
TRACKIO_RUN_COLOUR = (0xA8, 0x76, 0x9B)
#: pixels of the run's colour a page with its two curves drawn shows at least: measured,
#: TensorBoard 1,499 and trackio 1,371 with both drawn, TensorBoard 758 to 907 when
#: one of its charts was left empty (WebGL, before `forceSVG`)
MIN_CURVE_PIXELS = 1000


@dataclass
class TrackedRun:
    """What a run logged to a tracker: each scalar's ``(step, value)`` points and each
    text's ``(step, text)``, by the tag the dashboard shows."""

    name: str
    scalars: dict[str, list[tuple[int, float]]]
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)


def losses() -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """A training curve (20 steps) and a validation curve (every 5), falling like a run's."""
    train = [(step, round(1.5 + 2.7 * math.exp(-step / 6), 4)) for step in range(1, 21)]
    val = [(step, round(1.6 + 2.6 * math.exp(-step / 7), 4)) for step in range(5, 21, 5)]
    return train, val


SAMPLE = "ROMEO: But soft, what light through yonder window breaks?"


def write_tensorboard_run(run_dir: Path) -> TrackedRun:
    """Event files in ``<run_dir>/tensorboard/`` as a run's tensorboard tracker writes them:
    the training and validation losses and a sample (``torch.utils.tensorboard`` until the
    tracker lands; then a tiny slmkit run with ``[[trackers]] component = "tensorboard"``)."""
    from torch.utils.tensorboard import SummaryWriter

    train, val = losses()
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for step, value in train:
        writer.add_scalar("train/loss", value, step)
    for step, value in val:
        writer.add_scalar("val/loss", value, step)
    samples = [(10, SAMPLE), (20, SAMPLE.upper())]
    for step, text in samples:
        writer.add_text("sample", text, step)
    writer.close()
    # TensorBoard names a run by its folder under --logdir, and text tags "<tag>/text_summary"
    return TrackedRun(
        name=f"{run_dir.name}/tensorboard",
        scalars={"train/loss": train, "val/loss": val},
        texts={"sample/text_summary": samples},
    )


def write_trackio_run(store: Path, project: str, home: Path) -> TrackedRun:
    """A trackio run in the local store ``store`` (its ``TRACKIO_DIR``): the losses and a
    sample, logged by trackio's API in a process of its own (trackio reads ``TRACKIO_DIR``
    when imported); a tiny slmkit run with the trackio tracker will take its place."""
    train, val = losses()
    samples = [(10, SAMPLE), (20, SAMPLE.upper())]
    logged = {"train": train, "val": val, "samples": samples}
    script = """
import json, sys
import trackio
project, logged = sys.argv[1], json.loads(sys.argv[2])
trackio.init(project=project, name="tiny-run", auto_log_cpu=False, auto_log_gpu=False)
for step, value in logged["train"]:
    trackio.log({"train/loss": value}, step=step)
for step, value in logged["val"]:
    trackio.log({"val/loss": value}, step=step)
for step, text in logged["samples"]:
    trackio.log({"sample": text}, step=step)
trackio.finish()
"""
    done = subprocess.run(
        [sys.executable, "-c", script, project, json.dumps(logged)], capture_output=True,
        text=True, timeout=300, check=False, env=trackio_env(store, home),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return TrackedRun(
        name="tiny-run", scalars={"train/loss": train, "val/loss": val}, texts={"sample": samples}
    )


def trackio_env(store: Path, home: Path) -> dict[str, str]:
    """trackio's store in ``store``, offline, and nothing written to the real home."""
    return {**os.environ, **OFFLINE, "TRACKIO_DIR": str(store), "HF_HOME": str(home / "hf"),
            "HOME": str(home)}  # fmt: skip


def keep_for_docs(picture: Path, name: str) -> None:
    """With ``SLMKIT_DOCS_IMAGES=1``, copy the screenshot to ``docs/images/NAME``."""
    if os.environ.get("SLMKIT_DOCS_IMAGES") == "1":
        shutil.copyfile(picture, ROOT / "docs" / "images" / name)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f}s"
        time.sleep(0.25)


def test_tensorboard_serves_and_draws_the_runs_scalars_and_samples(tmp_path: Path) -> None:
    chromium()  # fails at once, naming the package, where it is missing
    runs = tmp_path / "runs"
    logged = write_tensorboard_run(runs / "20260101-000000-tiny-3f1a")
    port = free_port()
    base = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs),
               "--host", HOST, "--port", str(port)]  # fmt: skip
    env = {"HOME": str(tmp_path / "home")}
    with local_server(command, f"{base}/data/runs", tmp_path / "tensorboard.log", env):
        # TensorBoard loads event files in the background: the tags come when they are read
        wait_for(lambda: set(get_json(f"{base}/data/plugin/scalars/tags").get(logged.name, {}))
                 == set(logged.scalars), "TensorBoard listing the run's scalars")  # fmt: skip
        assert get_json(f"{base}/data/runs") == [logged.name]
        for tag, points in logged.scalars.items():
            query = urlencode({"run": logged.name, "tag": tag})
            served = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
            assert [step for _, step, _ in served] == [step for step, _ in points]
            # stored as float32
            assert [v for _, _, v in served] == pytest.approx([v for _, v in points], rel=1e-6)
        wait_for(lambda: get_json(f"{base}/data/plugin/text/tags").get(logged.name),
                 "TensorBoard listing the run's texts")  # fmt: skip
        assert get_json(f"{base}/data/plugin/text/tags") == {logged.name: list(logged.texts)}
        for tag, texts in logged.texts.items():
            query = urlencode({"run": logged.name, "tag": tag})
            served = get_json(f"{base}/data/plugin/text/text?{query}")
            assert [entry["step"] for entry in served] == [step for step, _ in texts]
            for entry, (_, text) in zip(served, texts, strict=True):
                assert text in html.unescape(entry["text"])  # rendered as Markdown in HTML

        # The time series page with its charts as SVG (TensorBoard's own `forceSVG` flag)
        # rather than WebGL, whose frames headless Chromium captures only some of the time;
        # the DOM then holds each curve: one path per scalar, a point per logged step.
        page = f"{base}/?forceSVG=true#timeseries"
        dom = page_dom(page, tmp_path / "chromium")
        curves = re.findall(r'<path d="(M[^"]+)" style="fill: none; stroke: rgb\([\d, ]+\); '
                            r'opacity: 1;', dom)  # fmt: skip
        assert sorted(curve.count("L") + 1 for curve in curves) == sorted(
            len(points) for points in logged.scalars.values()
        )
        picture = screenshot(page, tmp_path / "tensorboard.png", tmp_path / "chromium")
    check_not_blank(picture)
    assert colour_pixels(picture, TENSORBOARD_RUN_COLOUR) >= MIN_CURVE_PIXELS
    keep_for_docs(picture, "tensorboard.png")


def test_trackio_serves_and_draws_the_runs_metrics_and_samples(tmp_path: Path) -> None:
    chromium()
    project = "slmkit-tiny"
    store, home = tmp_path / "trackio", tmp_path / "home"
    logged = write_trackio_run(store, project, home)
    port = free_port()
    base = f"http://{HOST}:{port}"
    serve = (
        "import sys, trackio; trackio.show(project=sys.argv[1], open_browser=False, "
        "host=sys.argv[2], server_port=int(sys.argv[3]), share=False, block_thread=True)"
    )
    command = [sys.executable, "-c", serve, project, HOST, str(port)]
    with local_server(command, f"{base}/version", tmp_path / "trackio.log",
                      trackio_env(store, home)):  # fmt: skip
        api = f"{base}/api"
        assert post_json(f"{api}/get_all_projects", {})["data"] == [project]
        runs = post_json(f"{api}/get_runs_for_project", {"project": project})["data"]
        assert [run["name"] for run in runs] == [logged.name]
        for tag, points in logged.scalars.items():
            query = {"project": project, "run": logged.name, "metric_name": tag}
            served = post_json(f"{api}/get_metric_values", query)["data"]
            assert [(p["step"], p["value"]) for p in served] == points
        entries = post_json(f"{api}/get_logs", {"project": project, "run": logged.name})["data"]
        for tag, texts in logged.texts.items():
            assert [(e["step"], e[tag]) for e in entries if tag in e] == texts
        picture = screenshot(f"{base}/?project={project}&smoothing=0", tmp_path / "trackio.png",
                             tmp_path / "chromium")  # fmt: skip
    check_not_blank(picture)
    assert colour_pixels(picture, TRACKIO_RUN_COLOUR) >= MIN_CURVE_PIXELS
    keep_for_docs(picture, "trackio.png")
