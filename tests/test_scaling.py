"""Scaling laws: the fit recovers known laws, `slmkit scaling` reports and refuses,
`training.max_flops` decides a run's length."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from conftest import ROOT, events, run_main, train
from scipy.optimize import minimize_scalar

from slmkit.cli import main
from slmkit.config.resolve import load_experiment
from slmkit.flops import apply_max_flops, steps_for_flops
from slmkit.scaling import LAW_N, LAW_ND, FitError, Points, fit_law
from slmkit.scaling_plot import FIGURE_DPI, FIGURE_INCHES

TRUE_N = {"E": 1.5, "A": 30.0, "alpha": 0.35}
TRUE_ND = {**TRUE_N, "B": 400.0, "beta": 0.3}


def law_n(n: Any) -> Any:
    return TRUE_N["E"] + TRUE_N["A"] / np.asarray(n, dtype=float) ** TRUE_N["alpha"]


def law_nd(n: Any, d: Any) -> Any:
    return law_n(n) + TRUE_ND["B"] / np.asarray(d, dtype=float) ** TRUE_ND["beta"]


def noisy(loss: Any, seed: int, scale: float = 0.005) -> Any:
    """``loss`` times log-normal noise of ``scale`` (0.5%: a tiny run's seed-to-seed spread)."""
    return loss * np.exp(np.random.default_rng(seed).normal(0, scale, np.shape(loss)))


# -- the fit -------------------------------------------------------------------------------


def test_l_of_n_recovers_known_parameters_within_their_intervals() -> None:
    n = np.geomspace(1e4, 1e7, 8)
    points = Points.of(n, np.full_like(n, 1e6), noisy(law_n(n), seed=1))
    fit = fit_law(LAW_N, points, resamples=100, seed=0)
    estimates = fit.parameters()
    assert list(estimates) == ["E", "A", "alpha"]
    for name, true in TRUE_N.items():
        e = estimates[name]
        assert e.low <= true <= e.high, (name, e)
        assert e.low <= e.value <= e.high
    assert estimates["E"].value == pytest.approx(1.5, abs=0.02)
    assert estimates["alpha"].value == pytest.approx(0.35, abs=0.02)
    assert fit.failed_resamples == 0 and len(fit.draws) == 100
    # the curve runs through the points (within the noise) and its band holds the truth
    assert np.allclose(fit.predict(n, 1e6), law_n(n), rtol=0.01)
    low, high = fit.band(n, np.full_like(n, 1e6))
    assert np.all((low <= law_n(n)) & (law_n(n) <= high))
    assert fit.allocation(1e18) is None  # L(N) does not model D


def test_l_of_n_and_d_recovers_known_parameters_and_the_optimal_allocation() -> None:
    n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e4, 1e7, 4), np.geomspace(1e6, 1e9, 3)))
    fit = fit_law(LAW_ND, Points.of(n, d, noisy(law_nd(n, d), seed=2)), resamples=40, seed=0)
    for name, true in TRUE_ND.items():
        e = fit.parameters()[name]
        assert e.low <= true <= e.high, (name, e)
    # the closed-form optimum is the minimum of the fitted loss along C = 6ND
    budget = 1e18
    allocation = fit.allocation(budget)
    assert allocation is not None

    def along_budget(log_n: float) -> float:
        return float(fit.predict(math.exp(log_n), budget / 6 / math.exp(log_n))[0])

    along = minimize_scalar(along_budget, bounds=(math.log(1e3), math.log(1e12)), method="bounded")
    assert allocation["N"].value == pytest.approx(math.exp(along.x), rel=1e-3)
    assert allocation["N"].value * allocation["D"].value * 6 == pytest.approx(budget)
    assert allocation["L"].value == pytest.approx(along.fun, rel=1e-6)
    assert allocation["N"].low <= allocation["N"].value <= allocation["N"].high


def test_too_few_points_and_a_fit_that_does_not_converge_are_one_line_errors() -> None:
    n = np.array([1e4, 1e5])
    with pytest.raises(FitError, match=r"^2 distinct point\(s\) for the 3 parameters of L\(N\)"):
        fit_law(LAW_N, Points.of(n, [1e6, 1e6], law_n(n)))
    same = np.array([1e4, 1e4, 1e4, 1e5])  # four runs, two sizes
    with pytest.raises(FitError, match="2 distinct point"):
        fit_law(LAW_N, Points.of(same, [1e6] * 4, law_n(same)))
    rising = np.geomspace(1e4, 1e6, 5)  # bigger models doing worse: no law of this form
    with pytest.raises(FitError) as caught:
        fit_law(LAW_N, Points.of(rising, [1e6] * 5, [2.0, 2.1, 2.2, 2.3, 2.4]), resamples=10)
    message = str(caught.value)
    assert message.startswith("the fit of L(N) = E + A / N^alpha did not converge (")
    assert "is outside (" in message and "\n" not in message
    assert "(N, D, L) = (10,000, 1,000,000, 2.0000), (31,623, 1,000,000, 2.1000)" in message


# -- `slmkit scaling` on run folders ---------------------------------------------------------


#: what a fake run's experiment.toml holds: 4 windows of 32 tokens a step
EXPERIMENT: dict[str, Any] = {
    "experiment": {"name": "law", "seed": 1},
    "data": {"corpus": "python_docs", "val_fraction": 0.05},
    "tokenizer": {"name": "char"},
    "model": {"block": "gpt", "context_length": 32},
    "training": {"batch_size": 4, "grad_accum_steps": 1, "eval_batches": 2, "max_flops": 0.0},
}
TOKENS_PER_STEP = 4 * 32


def fake_run(root: Path, run_id: str, n: int, steps: int, loss: float, *, end: str = "run_end",
             experiment: dict[str, Any] | None = None, **start: Any) -> Path:  # fmt: skip
    """A run folder as a run of ``n`` non-embedding parameters and ``steps`` steps leaves it."""
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    exp = json.loads(json.dumps(experiment or EXPERIMENT))
    exp["training"]["max_steps"] = steps
    (run_dir / "experiment.toml").write_text(tomli_w.dumps(exp), encoding="utf-8")
    first = {"event": "run_start", "run_id": run_id, "timestamp": "2026-12-01T10:00:00Z",
             "pid": 2**22 + 12345, "non_embedding_params": n, "world_size": 1,
             "corpus": {"name": "python_docs", "sha256": "ab" * 32, "chars": 1000},
             "max_steps": steps, **start}  # fmt: skip
    lines = [first, {"event": "eval", "step": steps, "val_loss": loss}]
    if end == "run_end":
        lines.append({"event": "run_end", "summary": {"steps": steps}})
    elif end == "run_failed":
        lines.append({"event": "run_failed", "step": steps, "error": "hook exploded"})
    text = "".join(json.dumps({k: v for k, v in e.items() if v is not None}) + "\n" for e in lines)
    (run_dir / "log.jsonl").write_text(text, encoding="utf-8")
    return run_dir


SIZES = [10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000]


@pytest.fixture
def law_runs(tmp_path: Path) -> Path:
    """Six finished runs of one token budget whose losses follow L(N) with noise."""
    root = tmp_path / "runs"
    losses = noisy(law_n(SIZES), seed=3)
    for i, (n, loss) in enumerate(zip(SIZES, losses, strict=True)):
        fake_run(root, f"run{i}", n, 1000, float(loss))
    return root


def test_scaling_prints_the_fit_its_intervals_and_the_points(law_runs: Path) -> None:
    code, out, err = run_main("scaling", *(f"run{i}" for i in range(5)), "--runs-dir",
                              str(law_runs), "--resamples", "40")  # fmt: skip
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == ("L(N) = E + A / N^alpha, fitted to 5 runs (N: non-embedding "
                        "parameters; every run saw D = 128,000 tokens)")  # fmt: skip
    assert lines[1].split() == ["PARAMETER", "VALUE", "95%", "INTERVAL"]
    assert [line.split()[0] for line in lines[2:5]] == ["E", "A", "alpha"]
    assert "percentile bootstrap over runs, 40 resamples" in out
    assert re.search(r"^run4 +1,000,000 +128,000 +\d\.\d{4} +\d\.\d{4} +[+-]0\.\d{4}$", out, re.M)
    assert "compute-optimal allocation: L(N) does not model D" in out


def test_scaling_json_and_a_held_out_run(law_runs: Path) -> None:
    code, out, _ = run_main("scaling", "--runs-dir", str(law_runs), *(f"run{i}" for i in range(6)),
                            "--leave-out", "run5", "--resamples", "40", "--json")  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["law"] == "L(N)" and [p["run_id"] for p in result["points"]] == [
        f"run{i}" for i in range(5)]  # fmt: skip
    assert set(result["parameters"]) == {"E", "A", "alpha"}
    for name, true in TRUE_N.items():
        e = result["parameters"][name]
        assert e["low"] <= true <= e["high"], name
    held = result["held_out"]
    measured = float(noisy(law_n(SIZES), seed=3)[5])
    assert (held["run_id"], held["N"], held["D"]) == ("run5", 3_000_000, 128_000)
    assert held["val_loss"] == pytest.approx(measured)
    assert held["error"] == pytest.approx(measured - held["predicted"]["value"])
    assert abs(held["error"]) < 0.05  # the law extrapolates to a larger size
    code, text, _ = run_main("scaling", "--runs-dir", str(law_runs), *(f"run{i}" for i in range(6)),
                             "--leave-out", "run5", "--resamples", "40")  # fmt: skip
    value = held["predicted"]["value"]
    assert (f"held out run5 (N = 3,000,000, D = 128,000): predicted {value:.4f} "
            f"[{held['predicted']['low']:.4f}, {held['predicted']['high']:.4f}], "
            f"measured {measured:.4f}: off by {measured - value:+.4f} nats") in text  # fmt: skip


def decode_png(data: bytes) -> tuple[int, ...]:
    import matplotlib.image

    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return matplotlib.image.imread(io.BytesIO(data), format="png").shape


def test_the_report_embeds_the_picture_and_the_png_is_written(law_runs: Path, tmp_path) -> None:
    report, png = tmp_path / "scaling.html", tmp_path / "scaling.png"
    code, out, _ = run_main("scaling", "--runs-dir", str(law_runs), *(f"run{i}" for i in range(6)),
                            "--leave-out", "run5", "--resamples", "20", "--out", str(report),
                            "--png", str(png))  # fmt: skip
    assert code == 0 and f"wrote {report}" in out and f"wrote {png}" in out
    html = report.read_text(encoding="utf-8")
    (embedded,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert base64.b64decode(embedded) == png.read_bytes()
    width, height = (int(v * FIGURE_DPI) for v in FIGURE_INCHES)
    assert decode_png(png.read_bytes())[:2] == (height, width)
    assert "L(N) = E + A / N^alpha" in html and "held out run5" in html
    assert "http://" not in html.replace("http://www.w3.org", "")  # self-contained


def test_a_sweep_is_fitted_in_its_order_with_its_largest_run_held_out(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for i, (n, loss) in enumerate(zip(SIZES, noisy(law_n(SIZES), seed=3), strict=True)):
        sweep = {"id": "sweep-x", "index": i, "size": 6, "overrides": [f"model.d_model={i}"]}
        fake_run(root, f"s{5 - i}", n, 1000, float(loss), sweep=sweep)  # ids against the order
    fake_run(root, "other", 20_000, 1000, 2.5)  # not of the sweep
    code, out, _ = run_main("scaling", "--runs-dir", str(root), "--sweep", "sweep-x",
                            "--leave-out", "s0", "--resamples", "20", "--json")  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert [p["run_id"] for p in result["points"]] == ["s5", "s4", "s3", "s2", "s1"]
    assert result["held_out"]["run_id"] == "s0" and abs(result["held_out"]["error"]) < 0.05
    code, _, err = run_main("scaling", "--runs-dir", str(root), "--sweep", "sweep-y")
    assert (code, err) == (2, f"slmkit: error: --sweep sweep-y: no runs of that sweep in {root}\n")


def test_unfinished_and_failed_runs_are_left_out_and_listed(law_runs: Path) -> None:
    fake_run(law_runs, "broken", 50_000, 600, 2.0, end="run_failed")
    fake_run(law_runs, "killed", 60_000, 600, 2.0, end="")
    code, out, _ = run_main("scaling", "--runs-dir", str(law_runs), "broken", "killed",
                            *(f"run{i}" for i in range(5)), "--resamples", "20")  # fmt: skip
    assert code == 0
    assert "fitted to 5 runs" in out
    assert out.splitlines()[-1] == (
        "left out (2): broken (failed: hook exploded), killed (stopped)"
    )
    code, _, err = run_main("scaling", "--runs-dir", str(law_runs), "broken", "killed")
    assert code == 2
    assert err == ("slmkit: error: scaling: no finished run to fit (2 run(s) left out: "
                   "broken (failed: hook exploded), killed (stopped))\n")  # fmt: skip


DIFFERENCES = [
    ({"data": {"corpus": "python_docs", "val_fraction": 0.1}}, {},
     "data.val_fraction (0.05 in run0, run1, run2, run3; 0.1 in odd)"),
    ({"tokenizer": {"name": "bpe", "vocab_size": 256}}, {},
     'tokenizer.name ("char" in run0, run1, run2, run3; "bpe" in odd)'),
    ({"model": {"block": "gpt", "context_length": 64}}, {},
     "model.context_length (32 in run0, run1, run2, run3; 64 in odd)"),
    ({}, {"corpus": {"name": "python_docs", "sha256": "cd" * 32, "chars": 1000}},
     f'run_start.corpus.sha256 ("{"ab" * 32}" in run0, run1, run2, run3; "{"cd" * 32}" in odd)'),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "start", "named"), DIFFERENCES)
def test_runs_of_different_corpora_tokenizers_or_validation_sets_are_refused(
    law_runs: Path, tmp_path: Path, changes: dict[str, Any], start: dict[str, Any], named: str
) -> None:
    experiment = {**json.loads(json.dumps(EXPERIMENT)), **changes}
    fake_run(law_runs, "odd", 70_000, 1000, 2.0, experiment=experiment, **start)
    report = tmp_path / "report.html"
    code, out, err = run_main("scaling", "--runs-dir", str(law_runs), "--out", str(report),
                              *(f"run{i}" for i in range(4)), "odd")  # fmt: skip
    assert (code, out) == (2, "")
    assert err == (
        f"slmkit: error: scaling: the runs differ in {named}: a fit compares losses only of "
        "runs with one corpus, tokenizer and validation set\n"
    )
    assert not report.exists()  # nothing written


def test_other_refusals_are_one_line_and_write_nothing(law_runs: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    common = ["scaling", "--runs-dir", str(law_runs), "--out", str(report)]
    code, _, err = run_main(*common, "run0", "run1")
    assert code == 2 and err.startswith(
        "slmkit: error: scaling: 2 distinct point(s) for the 3 parameters of "
        "L(N) = E + A / N^alpha; at least 3 are needed: (N, D, L) = (10,000, 128,000, "
    )
    for i, loss in enumerate([2.0, 2.1, 2.2, 2.3]):  # bigger models doing worse
        fake_run(law_runs, f"rising{i}", SIZES[i], 1000, loss)
    code, _, err = run_main(*common, *(f"rising{i}" for i in range(4)), "--resamples", "10")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("slmkit: error: scaling: the fit of L(N) = E + A / N^alpha did not "
                          "converge (")  # fmt: skip
    assert "(N, D, L) = (10,000, 128,000, 2.0000), (30,000, 128,000, 2.1000)" in err
    old = fake_run(law_runs, "old", 40_000, 1000, 2.0, non_embedding_params=None)
    code, _, err = run_main(*common, "run0", "run1", "run2", "old")
    assert err == (f"slmkit: error: scaling: {old}: log.jsonl has no "
                   "run_start.non_embedding_params (the run was started by an older slmkit); "
                   "train it again to fit it\n")  # fmt: skip
    fake_run(law_runs, "longer", 40_000, 2000, 2.0)
    code, _, err = run_main(*common, "run0", "run1", "run2", "run3", "--leave-out", "longer")
    assert err == ("slmkit: error: --leave-out longer: it saw D = 256,000 tokens, the fitted "
                   "runs D = 128,000; L(N) holds at their D only\n")  # fmt: skip
    code, _, err = run_main(*common, "--budget", "0", "run0")
    assert err == "slmkit: error: --budget: must be > 0 FLOPs\n"
    code, _, err = run_main(*common, "run0", "--resamples", "5")
    assert err == "slmkit: error: --resamples: must be >= 10\n"
    code, _, err = run_main("scaling", "--runs-dir", str(law_runs))
    assert err == "slmkit: error: scaling: name the runs (folders or ids), or --sweep ID\n"
    assert not report.exists()


def test_runs_that_differ_in_tokens_fit_l_of_n_and_d_and_report_the_allocation(
    tmp_path: Path,
) -> None:
    root = tmp_path / "runs"
    names = []
    for n in (10_000, 100_000, 1_000_000, 10_000_000):
        for steps in (100, 1000, 10_000):
            names.append(f"n{n}-s{steps}")
            loss = float(noisy(law_nd(n, steps * TOKENS_PER_STEP), seed=len(names)))
            fake_run(root, names[-1], n, steps, loss)
    code, out, _ = run_main("scaling", "--runs-dir", str(root), *names, "--resamples", "20",
                            "--budget", "1e16", "--json")  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["law"] == "L(N, D)" and set(result["parameters"]) == set(TRUE_ND)
    allocation = result["allocation"]
    assert allocation["flops"] == 1e16
    assert 6 * allocation["N"]["value"] * allocation["D"]["value"] == pytest.approx(1e16)


# -- training.max_flops ------------------------------------------------------------------------


def test_max_flops_decides_max_steps_and_the_log_says_so(write_experiment, tmp_path, manager):
    path = write_experiment(
        {
            "training": {
                "max_flops": 1e9,
                "max_steps": 999,
                "eval_every": 0,
                "checkpoint_every": 0,
            },
            "sampling": {"every": 0},
        }
    )
    exp = load_experiment(path, manager)
    derived, budget = apply_max_flops(exp)
    assert budget is not None
    # gpt blocks of d_model 32, d_ff 64: 4 d^2 + 2 d d_ff weights, 3d + d + d_ff + d biases,
    # two LayerNorms; and the final LayerNorm
    per_layer = 4 * 32 * 32 + 2 * 32 * 64 + (3 * 32 + 32 + 64 + 32) + 2 * 2 * 32
    assert budget.non_embedding_params == 2 * per_layer + 2 * 32
    tokens = 4 * 32  # batch 4 x context 32
    steps = math.floor(1e9 / (6 * budget.non_embedding_params * tokens))
    assert derived.training.max_steps == budget.max_steps == steps == 75
    assert derived.config_hash == exp.config_hash  # a length, like max_steps
    run_dir = train(path, tmp_path / "runs", manager)
    (start,) = events(run_dir, "run_start")
    assert (start["max_steps"], start["max_steps_from_flops"]) == (75, True)
    assert start["non_embedding_params"] == budget.non_embedding_params
    assert events(run_dir, "run_end")[0]["summary"]["steps"] == 75
    saved = tomllib.loads((run_dir / "experiment.toml").read_text())["training"]
    assert (saved["max_steps"], saved["max_flops"]) == (75, 1e9)


def test_a_budget_too_small_for_one_step_trains_one_and_validate_shows_the_steps(capsys) -> None:
    assert steps_for_flops(1.0, 1000, 128) == 1
    assert steps_for_flops(6 * 1000 * 128 * 7.999, 1000, 128) == 7
    baseline = str(ROOT / "experiments" / "baseline.toml")
    assert main(["validate", baseline, "--set", "training.max_flops=1e15"]) == 0
    out = capsys.readouterr().out
    assert "# non-embedding parameters: 3,159,552\n" in out
    steps = math.floor(1e15 / (6 * 3_159_552 * 16 * 256))
    assert f"max_steps = {steps}\n" in out
    assert (
        f"# training.max_flops = 1e+15: {steps} steps of 4,096 tokens for 3,159,552 "
        "non-embedding parameters (C = 6ND; this replaces training.max_steps)"
    ) in out


def test_scaling_never_imports_torch(law_runs: Path) -> None:
    script = (
        "import sys; from slmkit.cli import main; "
        f"assert main(['scaling', '--runs-dir', {str(law_runs)!r}, 'run0', 'run1', 'run2', "
        "'--resamples', '10']) == 0; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ})  # fmt: skip
    assert done.returncode == 0, done.stderr
