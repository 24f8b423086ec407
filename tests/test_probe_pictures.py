"""Probe metrics read back from run logs, and drawn by ``slmkit compare`` (docs/probes.md).

The run folders here are written by hand with the events probes log, so every value read
back is known exactly.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import TINY, merge, run_main

from slmkit.probe_curves import LAYER_HEAD, PER_LAYER, SCALAR, ProbeMetric
from slmkit.probe_figure import HEATMAP_RUNS, formed_step, heatmap_runs, probes_figure
from slmkit.runs import read_run

STEPS = [0, 50, 100, 150]


def induction_score(step: int, shift: int = 0) -> list[list[float]]:
    """Layer x head scores: head 2 of layer 1 rises from 0.02 to 0.92."""
    rise = {0: 0.02, 50: 0.05, 100: 0.71, 150: 0.92}[step]
    return [[0.01, 0.02, 0.03, 0.04], [0.05, 0.06, round(rise - shift * 0.01, 4), 0.08]]


def probe_events(step: int, shift: int = 0) -> list[dict[str, Any]]:
    """What the built-in probes log at one evaluation (the event format of docs/probes.md)."""
    repeat = {0: 4.1, 50: 4.0, 100: 1.5, 150: 0.4}[step]
    return [
        {"event": "probe", "step": step, "probe": "induction", "plugin": "slmkit_builtin.probes",
         "metrics": {"score": induction_score(step, shift), "loss_first_half": 4.2,
                     "loss_repeat_half": repeat, "loss_drop": round(4.2 - repeat, 4)}},
        {"event": "probe", "step": step, "probe": "previous_token",
         "plugin": "slmkit_builtin.probes",
         "metrics": {"score": [[0.9, 0.1, 0.2, 0.3], [0.1, 0.1, 0.1, 0.1]]}},
        {"event": "probe", "step": step, "probe": "logit_lens", "plugin": "slmkit_builtin.probes",
         "metrics": {"loss": [4.5, 4.3 - step / 100]}},
    ]  # fmt: skip


def write_run(root: Path, name: str, events: list[dict[str, Any]], lr: float = 1e-3) -> Path:
    """A run folder holding ``events`` after its ``run_start``, and its experiment."""
    run = root / name
    run.mkdir(parents=True)
    experiment = merge(TINY, {"experiment": {"name": "probed"}, "optimizer": {"learning_rate": lr}})
    (run / "experiment.toml").write_text(tomli_w.dumps(experiment), encoding="utf-8")
    start = {"event": "run_start", "run_id": name, "experiment": "probed", "max_steps": 150,
             "timestamp": "2026-12-01T10:00:00Z"}  # fmt: skip
    lines = [start, *events, {"event": "run_end", "summary": {"steps": 150}}]
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8")
    return run


def probed_run(root: Path, name: str = "probed", shift: int = 0, lr: float = 1e-3) -> Path:
    events: list[dict[str, Any]] = []
    for step in STEPS:
        train = {"event": "train_step", "step": step or 1, "train_loss": 4.0 - step / 100}
        val = {"event": "eval", "step": step or 1, "val_loss": 4.1 - step / 100}
        events += [train, val, *probe_events(step, shift)]
    return write_run(root, name, events, lr)


def plain_run(root: Path, name: str = "plain") -> Path:
    return write_run(root, name, [{"event": "train_step", "step": 1, "train_loss": 4.0},
                                  {"event": "eval", "step": 1, "val_loss": 4.1}])  # fmt: skip


def test_probe_metrics_are_read_back_exactly_with_their_shapes(tmp_path: Path) -> None:
    record = read_run(probed_run(tmp_path))
    assert record.status == "finished"
    metrics = {m.key: m for m in record.probes}
    assert list(metrics) == ["induction.score", "induction.loss_first_half",
                             "induction.loss_repeat_half", "induction.loss_drop",
                             "previous_token.score", "logit_lens.loss"]  # fmt: skip
    score = metrics["induction.score"]
    assert (score.shape, score.steps) == (LAYER_HEAD, STEPS)
    assert score.values == [induction_score(s) for s in STEPS]
    assert score.best_head() == (1, 2, 0.92)
    assert score.best_head(0) == (1, 3, 0.08)
    assert score.head_summary("max") == [0.08, 0.08, 0.71, 0.92]
    assert score.head_summary("min") == [0.01] * 4
    repeat = metrics["induction.loss_repeat_half"]
    assert (repeat.shape, repeat.values) == (SCALAR, [4.1, 4.0, 1.5, 0.4])
    lens = metrics["logit_lens.loss"]
    assert (lens.shape, lens.n_layers) == (PER_LAYER, 2)
    assert lens.layer_series(1) == [4.3, 3.8, 3.3, 2.8]


def test_a_resumed_run_keeps_the_probe_values_of_the_resumed_process(tmp_path: Path) -> None:
    start = {"event": "run_start", "run_id": "r", "timestamp": "2026-12-01T10:00:00Z"}
    killed = [*probe_events(0), *probe_events(50), *probe_events(100, shift=5)]
    resumed = [{**start, "resumed_from_step": 50}, *probe_events(100), *probe_events(150)]
    events = killed + resumed
    record = read_run(write_run(tmp_path, "r", events))
    score = next(m for m in record.probes if m.key == "induction.score")
    assert score.steps == STEPS
    assert score.values[2] == induction_score(100)  # not the killed process's 0.66


def test_non_finite_probe_values_read_as_nan_and_malformed_ones_damage_the_run(
    tmp_path: Path,
) -> None:
    events = [
        {"event": "probe", "step": 1, "probe": "induction", "plugin": "p",
         "metrics": {"loss_drop": None, "score": [[0.5, None]]},
         "nonfinite": {"metrics.loss_drop": "nan", "metrics.score.0.1": "nan"}},
        {"event": "probe", "step": 2, "probe": "induction", "plugin": "p",
         "metrics": {"loss_drop": [1.0], "score": "high"}},
        {"event": "probe", "step": 3, "probe": "induction", "plugin": "p", "metrics": 7},
    ]  # fmt: skip
    record = read_run(write_run(tmp_path, "odd", events))
    drop, score = record.probes
    assert drop.steps == [1] and math.isnan(drop.values[0])  # type: ignore[arg-type]
    assert score.values[0][0][0] == 0.5 and math.isnan(score.values[0][0][1])  # type: ignore[index]
    assert score.best_head() == (0, 0, 0.5)
    assert record.status == "damaged"
    assert record.status_detail == "log.jsonl: 3 malformed probe event(s) or metric value(s)"


def test_compare_json_carries_every_probe_series(tmp_path: Path) -> None:
    probed, plain = probed_run(tmp_path), plain_run(tmp_path)
    code, out, err = run_main("compare", str(probed), str(plain), "--json")
    assert (code, err) == (0, "")
    probes = json.loads(out)["probes"]
    assert probes["plain"] == {}
    assert probes["probed"]["induction"]["score"] == {
        "shape": "layer_head",
        "steps": STEPS,
        "values": [induction_score(s) for s in STEPS],
    }
    assert probes["probed"]["induction"]["loss_drop"]["values"] == [0.1, 0.2, 2.7, 3.8]
    assert probes["probed"]["logit_lens"]["loss"]["values"][-1] == [4.5, 2.8]


def test_compare_prints_each_probe_metrics_latest_value(tmp_path: Path) -> None:
    code, out, err = run_main("compare", str(probed_run(tmp_path)))
    assert (code, err) == (0, "")
    table = out[out.index("probes (latest evaluation") :]
    assert "probed  induction.score             150   0.9200 (L1 H2)" in table
    assert "probed  induction.loss_repeat_half  150   0.4000" in table
    assert "probed  logit_lens.loss             150   4.5000 2.8000" in table


def test_runs_without_probes_print_and_draw_no_probes(tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    code, out, err = run_main("compare", str(plain_run(tmp_path)), "--out", str(report))
    assert (code, err) == (0, "")
    assert "probes (latest" not in out
    html = report.read_text(encoding="utf-8")
    assert "<h2>Probes</h2>" not in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 1  # the loss curves


def test_probes_png_of_runs_without_probes_is_an_error_and_writes_nothing(
    tmp_path: Path,
) -> None:
    report, png = tmp_path / "report.html", tmp_path / "probes.png"
    code, _, err = run_main("compare", str(plain_run(tmp_path)), "--out", str(report),
                            "--probes-png", str(png))  # fmt: skip
    assert code == 2
    assert err.strip() == (f"slmkit: error: --probes-png {png}: none of the runs logged probe "
                           "metrics (an experiment's [[probes]] tables make them)")  # fmt: skip
    assert not report.exists() and not png.exists()


def decode_png(data: bytes) -> tuple[int, ...]:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(data), format="png").shape


def test_the_report_embeds_the_probes_picture_written_by_probes_png(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    probed, plain = probed_run(runs), plain_run(runs)
    report, png = tmp_path / "report.html", tmp_path / "probes.png"
    code, out, _ = run_main("compare", str(probed), str(plain), "--out", str(report),
                            "--probes-png", str(png))  # fmt: skip
    assert code == 0
    assert f"wrote {png}" in out
    html = report.read_text(encoding="utf-8")
    section = html[html.index("<h2>Probes</h2>") : html.index("<h2>Latest samples</h2>")]
    (embedded,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', section)
    assert base64.b64decode(embedded) == png.read_bytes()
    figure = probes_figure([read_run(probed), read_run(plain)])
    width, height = figure.get_size_inches() * figure.dpi
    assert decode_png(png.read_bytes())[:2] == (round(height), round(width))
    assert "induction.score" in section and "L1 H2" in section  # the latest values' table


def test_the_picture_draws_a_panel_per_probe_and_a_heatmap_per_score(tmp_path: Path) -> None:
    figure = probes_figure([read_run(probed_run(tmp_path))])
    curves, heads = figure.subfigs
    titles = [a.get_title() for a in curves.axes if a.get_visible() and a.get_title()]
    assert titles == ["induction", "previous_token", "logit_lens"]
    induction = curves.axes[0]
    right = next(
        a for a in curves.axes if a is not induction and a.bbox.bounds == induction.bbox.bounds
    )
    assert right.get_ylim() == (-0.02, 1.02)
    highest = next(line for line in right.lines if len(line.get_xdata()) == 4)
    assert list(highest.get_ydata()) == [0.08, 0.08, 0.71, 0.92]
    maps = [a for a in heads.axes if a.images]
    assert [a.get_title() for a in maps] == [
        "probed\ninduction.score, step 150",
        "probed\nprevious_token.score, step 150",
    ]
    image = maps[0].images[0]
    assert image.get_clim() == (0.0, 1.0)
    assert image.get_array().tolist() == induction_score(150)


def test_the_step_where_a_score_first_passes_one_half_is_marked(tmp_path: Path) -> None:
    figure = probes_figure([read_run(probed_run(tmp_path))])
    curves = figure.subfigs[0]
    induction, previous = curves.axes[0], curves.axes[1]
    assert induction.get_ylabel() == "loss (nats)"  # the three induction losses
    right = next(a for a in curves.axes if a is not induction
                 and a.bbox.bounds == induction.bbox.bounds)  # fmt: skip
    marks = [line for line in right.lines if list(line.get_xdata()) == [100, 100]]
    assert len(marks) == 1  # the highest head: 0.08, 0.08, 0.71 at step 100, 0.92
    assert [t.get_text() for t in right.texts if "at step" in t.get_text()] == ["> 0.5 at step 100"]
    # previous_token's best head is at 0.9 from the first evaluation: nothing formed in view
    assert not [t for t in previous.texts if "at step" in t.get_text()]


def test_formed_step_is_the_first_crossing_from_below() -> None:
    def metric(highest: list[float]) -> ProbeMetric:
        values = [[[0.0, v]] for v in highest]
        return ProbeMetric("induction", "score", LAYER_HEAD, [10, 20, 30], values)

    assert formed_step(metric([0.1, 0.6, 0.4])) == 20
    assert formed_step(metric([0.5, 0.5, 0.51])) == 30  # 0.5 itself is not above
    assert formed_step(metric([0.1, 0.2, 0.3])) is None
    assert formed_step(metric([0.7, 0.2, 0.9])) is None  # above at the start: no crossing seen


def test_two_probes_fill_the_width_in_two_columns(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    for step in STEPS:
        events += [e for e in probe_events(step) if e["probe"] != "logit_lens"]
    figure = probes_figure([read_run(write_run(tmp_path, "two", events))])
    curves, heads = figure.subfigs
    panels = [a for a in curves.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["induction", "previous_token"]
    assert all(a.get_visible() for a in curves.axes)  # no empty third column
    assert len(heads.axes) == 2 * 2  # two heatmaps and their colour bars


def test_heatmaps_are_drawn_for_the_first_runs_only(tmp_path: Path) -> None:
    records = [read_run(probed_run(tmp_path, f"run{i}", lr=i / 1000)) for i in range(6)]
    assert [r.run_id for r in heatmap_runs(records)] == [f"run{i}" for i in range(HEATMAP_RUNS)]
    figure = probes_figure(records)
    assert len([a for a in figure.subfigs[1].axes if a.images]) == 2 * HEATMAP_RUNS
    assert len(figure.legends[0].get_texts()) == 6  # every run's curves


@pytest.fixture(autouse=True)
def _no_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
