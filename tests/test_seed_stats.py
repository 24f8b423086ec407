"""Groups of seeds in `slmkit compare`: groups, means, intervals, Welch tests, Holm, refusals,
groups of one, runs left out, the JSON, the report and the picture.

Every expected value is computed here from the losses the runs logged in ``log.jsonl``,
with numpy and the t distribution's quantiles (Welch's statistic and degrees of freedom
written out), never through slmkit's own statistics.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from conftest import TINY, merge, run_main
from scipy import stats

from slmkit.runlog import read_events
from slmkit.runs import Curve, read_run
from slmkit.seed_groups import Group, pick_baseline
from slmkit.seed_stats import (
    GroupStats,
    MeanCurve,
    compare_groups,
    estimate,
    holm,
    mean_curve,
)

LEARNING_RATES = (0.001, 0.003)
SEEDS = (1, 2, 3)


def corpus_text() -> str:
    """A small text file corpus: words drawn from a fixed generator."""
    words = ["the", "model", "reads", "a", "line", "of", "text", "and", "learns", "which"]
    draw = random.Random(0)
    return "\n".join(" ".join(draw.choice(words) for _ in range(12)) for _ in range(400))


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory) -> dict[str, Any]:
    """A 2 learning rates x 3 seeds sweep of tiny runs on a small file corpus."""
    root = tmp_path_factory.mktemp("seeds")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    experiment = merge(TINY, {
        "data": {"corpus": "file", "path": str(corpus), "val_fraction": 0.1},
        "training": {**TINY["training"], "max_steps": 4, "eval_every": 2, "checkpoint_every": 0},
        "sampling": {"every": 0, "max_new_tokens": 8},
    })  # fmt: skip
    path = root / "tiny.toml"
    path.write_text(tomli_w.dumps(experiment), encoding="utf-8")
    runs_dir = root / "runs"
    code, out, err = run_main(
        "run", str(path), "--runs-dir", str(runs_dir),
        "--sweep", "optimizer.learning_rate=" + ",".join(map(str, LEARNING_RATES)),
        "--sweep", "experiment.seed=" + ",".join(map(str, SEEDS)),
    )  # fmt: skip
    assert code == 0, err
    sweep_id = re.search(r"sweep (sweep-\S+): 6 runs of", out).group(1)
    by_index = sorted(runs_dir.iterdir(), key=lambda p: read_run(p).sweep["index"])
    return {"root": root, "runs_dir": runs_dir, "sweep_id": sweep_id, "runs": by_index}


def compare_json(*args: str) -> dict[str, Any]:
    code, out, err = run_main("compare", *args, "--json")
    assert code == 0, err
    return json.loads(out)


# -- independent statistics: from the log, with numpy ----------------------------------------


def logged(run_dir: Path) -> dict[str, Any]:
    """The run's learning rate, and its final and best validation loss and final bits/char,
    read from its own files."""
    evals = [e for e in read_events(run_dir / "log.jsonl") if e["event"] == "eval"]
    experiment = tomllib.loads((run_dir / "experiment.toml").read_text(encoding="utf-8"))
    return {
        "lr": experiment["optimizer"]["learning_rate"],
        "val_loss": evals[-1]["val_loss"],
        "best_val_loss": min(e["val_loss"] for e in evals),
        "val_bpc": evals[-1]["val_bpc"],
        "curve": {e["step"]: e["val_loss"] for e in evals},
    }


def mean_std_interval(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, sample std, and the 95 % t-interval of the mean: mean -+ t_0.975(n-1) s/sqrt(n)."""
    a = np.asarray(values, dtype=float)
    mean, std = float(a.mean()), float(a.std(ddof=1))
    half = stats.t.ppf(0.975, len(a) - 1) * std / math.sqrt(len(a))
    return mean, std, mean - half, mean + half


def welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float, float, float]:
    """mean(a) - mean(b), its 95 % Welch interval and two-sided p, from the formulas."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    diff = float(np.mean(a) - np.mean(b))
    p = 2 * stats.t.sf(abs(diff / se), df)
    half = stats.t.ppf(0.975, df) * se
    return diff, diff - half, diff + half, float(p)


def by_group(seed_sweep) -> dict[float, list[dict[str, Any]]]:
    groups: dict[float, list[dict[str, Any]]] = {}
    for run_dir in seed_sweep["runs"]:
        info = logged(run_dir)
        groups.setdefault(info["lr"], []).append({**info, "run_id": run_dir.name})
    return groups


# -- the groups and their statistics -----------------------------------------------------


def test_groups_means_and_intervals_match_numpy_on_the_logged_losses(seed_sweep) -> None:
    data = compare_json("--sweep", seed_sweep["sweep_id"], "--runs-dir",
                        str(seed_sweep["runs_dir"]))  # fmt: skip
    expected = by_group(seed_sweep)
    assert [g["label"] for g in data["groups"]] == [
        "optimizer.learning_rate=0.001", "optimizer.learning_rate=0.003"
    ]  # fmt: skip
    assert [g["baseline"] for g in data["groups"]] == [True, False]  # the first, by default
    for group, lr in zip(data["groups"], LEARNING_RATES, strict=True):
        runs = expected[lr]
        assert group["values"] == {"optimizer.learning_rate": lr}
        assert group["runs"] == [r["run_id"] for r in runs] and group["n"] == 3
        for metric in ("val_loss", "best_val_loss", "val_bpc"):
            values = [r[metric] for r in runs]
            mean, std, low, high = mean_std_interval(values)
            shown = group["metrics"][metric]
            assert shown["values"] == values and shown["n"] == 3
            assert shown["mean"] == pytest.approx(mean, rel=1e-12)
            assert shown["std"] == pytest.approx(std, rel=1e-12)
            assert (shown["ci_low"], shown["ci_high"]) == pytest.approx((low, high), rel=1e-12)
            assert low < mean < high
    assert data["left_out"] == []
    assert data["statistics"]["confidence"] == 0.95
    assert data["statistics"]["significance_level"] == 0.05


def test_each_group_is_tested_against_the_baseline_with_welch(seed_sweep) -> None:
    data = compare_json("--sweep", seed_sweep["sweep_id"], "--runs-dir",
                        str(seed_sweep["runs_dir"]))  # fmt: skip
    expected = by_group(seed_sweep)
    assert [c["metric"] for c in data["comparisons"]] == ["val_loss", "best_val_loss", "val_bpc"]
    for comparison in data["comparisons"]:
        metric = comparison["metric"]
        a = [r[metric] for r in expected[0.003]]
        b = [r[metric] for r in expected[0.001]]
        diff, low, high, p = welch_by_hand(a, b)
        assert comparison["group"] == "optimizer.learning_rate=0.003"
        assert comparison["baseline"] == "optimizer.learning_rate=0.001"
        assert comparison["difference"] == pytest.approx(diff, rel=1e-12)
        assert (comparison["ci_low"], comparison["ci_high"]) == pytest.approx((low, high))
        assert comparison["p_value"] == pytest.approx(p, rel=1e-9)
        assert comparison["p_holm"] == comparison["p_value"]  # one group compared
        assert comparison["significant"] == (p < 0.05)
        way = "lower" if diff < 0 else "higher"
        assert comparison["verdict"] == (
            f"significant: {way} than the baseline" if p < 0.05 else "not significant"
        )


def test_the_table_shows_each_group_and_says_plainly_what_is_significant(seed_sweep) -> None:
    code, out, _ = run_main("compare", "--sweep", seed_sweep["sweep_id"], "--runs-dir",
                            str(seed_sweep["runs_dir"]), "--baseline",
                            "optimizer.learning_rate=3e-3")  # fmt: skip
    assert code == 0
    text = out[out.index("groups of seeds") :]
    lines = text.splitlines()
    assert lines[0] == ("groups of seeds (2 groups of runs whose experiments differ only in the "
                        "seed; 95% CI: the t-interval of the mean):")  # fmt: skip
    assert lines[1].split() == ["GROUP", "N", "METRIC", "MEAN", "STD", "95%", "CI"]
    expected = by_group(seed_sweep)
    mean, std, low, high = mean_std_interval([r["val_loss"] for r in expected[0.003]])
    assert lines[5].split() == ["optimizer.learning_rate=0.003", "(baseline)", "3", "val_loss",
                                f"{mean:.4f}", f"{std:.4f}", f"[{low:.4f},",
                                f"{high:.4f}]"]  # fmt: skip
    heading = next(line for line in lines if line.startswith("against the baseline"))
    assert heading.startswith("against the baseline optimizer.learning_rate=0.003: ")
    assert "Holm over the 1 group compared" in heading and "p (Holm) < 0.05" in heading
    row = lines[lines.index(heading) + 2].split()
    diff, low, high, p = welch_by_hand([r["val_loss"] for r in expected[0.001]],
                                       [r["val_loss"] for r in expected[0.003]])  # fmt: skip
    assert row[:5] == ["optimizer.learning_rate=0.001", "val_loss", f"{diff:+.4f}",
                       f"[{low:.4f},", f"{high:.4f}]"]  # fmt: skip
    way = "lower" if diff < 0 else "higher"
    verdict = "not significant" if p >= 0.05 else f"significant: {way} than the baseline"
    assert " ".join(row[7:]) == verdict


def test_mean_curves_and_their_bands_match_numpy_step_by_step(seed_sweep) -> None:
    data = compare_json(*map(str, seed_sweep["runs"]))
    expected = by_group(seed_sweep)
    for group, lr in zip(data["groups"], LEARNING_RATES, strict=True):
        curves = [r["curve"] for r in expected[lr]]
        assert group["val_curve"]["steps"] == [2, 4]
        for i, step in enumerate((2, 4)):
            mean, _, low, high = mean_std_interval([c[step] for c in curves])
            assert group["val_curve"]["mean"][i] == pytest.approx(mean, rel=1e-12)
            assert group["val_curve"]["low"][i] == pytest.approx(low, rel=1e-12)
            assert group["val_curve"]["high"][i] == pytest.approx(high, rel=1e-12)


def test_mean_curve_uses_the_steps_every_run_logged() -> None:
    curves = [Curve([1, 2, 3], [4.0, 3.0, 2.0]), Curve([2, 3, 4], [3.5, math.nan, 1.0])]
    curve = mean_curve(curves)
    assert curve.steps == [2]  # step 3 is NaN in one run, steps 1 and 4 logged by one only
    assert curve.mean == [3.25]
    one = mean_curve(curves[:1])
    assert one.steps == [1, 2, 3] and one.low is None and one.high is None


# -- Holm, a group of one, equal values ------------------------------------------------------


def test_holm_against_hand_computed_values() -> None:
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the 0.06 before it
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.3, 0.6, 0.9]) == pytest.approx([0.9, 1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []


def group_stats(label: float, values: list[float]) -> GroupStats:
    group = Group({"optimizer.learning_rate": label}, [])
    return GroupStats(group, {"val_loss": estimate(values)}, MeanCurve([], []), MeanCurve([], []))


def test_several_groups_are_holm_corrected_per_metric() -> None:
    base = [1.00, 1.10, 1.05, 1.02]
    others = {0.002: [0.90, 0.95, 0.92, 0.91], 0.003: [1.01, 1.12, 1.00, 1.06],
              0.004: [0.80, 0.85, 0.79, 0.83]}  # fmt: skip
    groups = [group_stats(0.001, base), *(group_stats(k, v) for k, v in others.items())]
    comparisons = compare_groups(groups, 0)
    raw = [welch_by_hand(v, base)[3] for v in others.values()]
    m = len(raw)
    order = sorted(range(m), key=lambda i: raw[i])
    expected = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):  # Holm's step-down, written out again here
        running = max(running, min(1.0, (m - rank) * raw[i]))
        expected[i] = running
    assert [c.group for c in comparisons] == [1, 2, 3]
    assert [c.p_value for c in comparisons] == pytest.approx(raw, rel=1e-9)
    assert [c.p_holm for c in comparisons] == pytest.approx(expected, rel=1e-9)
    assert comparisons[1].verdict == "not significant"
    assert comparisons[0].verdict == "significant: lower than the baseline"


def test_a_group_of_one_has_no_interval_and_no_test() -> None:
    one = estimate([2.5])
    assert (one.n, one.mean, one.std, one.low, one.high) == (1, 2.5, None, None, None)
    groups = [group_stats(0.001, [1.0, 1.1, 1.2]), group_stats(0.003, [0.9])]
    (comparison,) = compare_groups(groups, 0)
    assert comparison.p_value is None and comparison.p_holm is None
    assert comparison.difference == pytest.approx(0.9 - 1.1)
    assert comparison.verdict == "no test (needs 2+ runs in both)"
    same = estimate([1.5, 1.5])  # no spread: the interval is the mean itself
    assert (same.std, same.low, same.high) == (0.0, 1.5, 1.5)
    flat = compare_groups([group_stats(0.001, [1.0, 1.0]), group_stats(0.003, [2.0, 2.0])], 0)
    assert flat[0].verdict == "no test (no spread in either)"


def test_runs_of_one_seed_each_show_n_1_and_no_interval(seed_sweep) -> None:
    first_seeds = [seed_sweep["runs"][0], seed_sweep["runs"][3]]  # seed 1 of each rate
    code, out, _ = run_main("compare", *map(str, first_seeds))
    assert code == 0
    text = out[out.index("groups of seeds") :].splitlines()
    row = text[2].split()
    assert row[:3] == ["optimizer.learning_rate=0.001", "1", "val_loss"]  # no baseline: no tests
    assert row[3] == f"{logged(first_seeds[0])['val_loss']:.4f}"
    assert row[4:] == ["-", "no", "interval", "(1", "run)"]
    assert "against the baseline" not in out  # nothing to test
    assert text[-1] == ("(every group is one run: no intervals and no tests; more seeds give "
                        "them: --sweep experiment.seed=1,2,3)")  # fmt: skip
    data = compare_json(*map(str, first_seeds))
    metrics = data["groups"][1]["metrics"]["val_loss"]
    assert (metrics["n"], metrics["std"], metrics["ci_low"], metrics["ci_high"]) == (
        1, None, None, None)  # fmt: skip
    assert metrics["mean"] == logged(first_seeds[1])["val_loss"]
    assert data["comparisons"] == []


def test_a_group_of_one_beside_a_group_of_three(seed_sweep) -> None:
    runs = [*seed_sweep["runs"][:3], seed_sweep["runs"][3]]
    code, out, _ = run_main("compare", *map(str, runs))
    assert code == 0
    rows = [line.split() for line in out[out.index("GROUP  ") :].splitlines()]
    assert rows[4][:2] == ["optimizer.learning_rate=0.003", "1"]
    assert " ".join(rows[4][-4:]) == "no interval (1 run)"
    assert "no test (needs 2+ runs in both)" in out


def test_compare_takes_several_sweeps_and_names_one_it_cannot_find(seed_sweep) -> None:
    runs_dir, sweep = str(seed_sweep["runs_dir"]), seed_sweep["sweep_id"]
    both = compare_json("--runs-dir", runs_dir, "--sweep", sweep, "--sweep", sweep)
    assert [len(g["runs"]) for g in both["groups"]] == [3, 3]  # a run named twice counts once
    two = map(str, seed_sweep["runs"][:2])
    named = compare_json(*two, "--runs-dir", runs_dir, "--sweep", sweep)
    assert named["groups"] == both["groups"]
    code, _, err = run_main("compare", "--runs-dir", runs_dir, "--sweep", sweep, "--sweep", "nope")
    assert code == 2
    assert err == f"slmkit: error: --sweep nope: no runs of that sweep in {runs_dir}\n"


def test_a_run_written_before_a_kernel_key_existed_groups_with_runs_of_today(
    seed_sweep, tmp_path: Path
) -> None:
    runs = copies(seed_sweep, tmp_path / "old")
    edit_experiment(runs[0], "model", "final_norm", DROP)  # as a run folder of before the key
    edit_experiment(runs[1], "training", "precision", DROP)  # absent: the fp32 it was added with
    edit_experiment(runs[2], "training", "precision", "fp32")
    assert read_run(runs[0]).config_hash == read_run(seed_sweep["runs"][0]).config_hash
    result = compare_json(*map(str, runs))
    assert [(g["label"], len(g["runs"])) for g in result["groups"]] == [
        ("optimizer.learning_rate=0.001", 3), ("optimizer.learning_rate=0.003", 3),
    ]  # fmt: skip
    code, out, _ = run_main("compare", *map(str, runs[:3]))
    assert code == 0 and "(absent)" not in out and "model.final_norm" not in out


def test_runs_apart_only_in_their_trackers_are_one_group(seed_sweep, tmp_path: Path) -> None:
    # trackers only watch a run (config_hash leaves them out): they make no other experiment
    runs = copies(seed_sweep, tmp_path / "tracked")
    edit_experiment(runs[0], "", "trackers", [{"name": "tensorboard", "enabled": True}])
    assert read_run(runs[0]).config_hash == read_run(seed_sweep["runs"][0]).config_hash
    result = compare_json(*map(str, runs))
    assert [(g["label"], len(g["runs"])) for g in result["groups"]] == [
        ("optimizer.learning_rate=0.001", 3), ("optimizer.learning_rate=0.003", 3),
    ]  # fmt: skip


def test_group_labels_leave_out_another_components_options_while_they_stay_apart(
    seed_sweep, tmp_path: Path
) -> None:
    runs = copies(seed_sweep, tmp_path / "opt")
    for run in runs[3:]:  # the second learning rate's runs as another optimizer's
        edit_experiment(run, "optimizer", "name", "other")
        edit_experiment(run, "optimizer", "betas", DROP)
        edit_experiment(run, "optimizer", "momentum", 0.9)
    labels = [g["label"] for g in compare_json(*map(str, runs))["groups"]]
    assert labels == [
        'optimizer.learning_rate=0.001, optimizer.name="adamw"',
        'optimizer.learning_rate=0.003, optimizer.name="other"',
    ]
    for run in runs[3:]:  # now apart only in keys each group lacks: those are the labels
        edit_experiment(run, "optimizer", "name", "adamw")
        edit_experiment(run, "optimizer", "learning_rate", 0.001)
    labels = [g["label"] for g in compare_json(*map(str, runs))["groups"]]
    assert labels == [
        "optimizer.betas=[0.9, 0.95], optimizer.momentum=(absent)",
        "optimizer.betas=(absent), optimizer.momentum=0.9",
    ]


# -- bad input ---------------------------------------------------------------------------


def copies(seed_sweep, root: Path) -> list[Path]:
    """The six runs copied into ``root``, so they may be changed."""
    root.mkdir()
    return [Path(shutil.copytree(p, root / p.name)) for p in seed_sweep["runs"]]


#: the value :func:`edit_experiment` takes to remove a key
DROP: Any = object()


def edit_experiment(run_dir: Path, table: str, key: str, value: Any) -> None:
    """Set ``table.key`` of the run's ``experiment.toml`` (a top-level key when ``table`` is
    empty) to ``value``, or remove it (:data:`DROP`)."""
    path = run_dir / "experiment.toml"
    experiment = tomllib.loads(path.read_text(encoding="utf-8"))
    node = experiment[table] if table else experiment
    if value is DROP:
        del node[key]
    else:
        node[key] = value
    path.write_text(tomli_w.dumps(experiment), encoding="utf-8")


@pytest.mark.parametrize(
    ("table", "key", "value", "named"),
    [
        ("data", "val_fraction", 0.2, "data.val_fraction differs (0.1 vs 0.2)"),
        ("tokenizer", "name", "bpe", 'tokenizer.name differs ("char" vs "bpe")'),
        ("data", "path", "/elsewhere/corpus.txt", "data.path differs"),
        ("model", "context_length", 16, "model.context_length differs (32 vs 16)"),
        ("training", "eval_batches", 3, "validation windows (training.batch_size x world_size x "
         "training.eval_batches) differs (4 x 1 x 2 vs 4 x 1 x 3)"),
    ],
)  # fmt: skip
def test_groups_of_other_validation_sets_are_refused_naming_the_runs_and_key(
    seed_sweep, tmp_path: Path, table: str, key: str, value: Any, named: str
) -> None:
    runs = copies(seed_sweep, tmp_path / "runs")
    for run_dir in runs[3:]:  # the second group
        edit_experiment(run_dir, table, key, value)
    report = tmp_path / "report.html"
    code, out, err = run_main("compare", *map(str, runs), "--out", str(report))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and named in err
    assert f"runs {runs[0].name} and {runs[3].name} were not measured on the same" in err
    assert not report.exists()  # nothing written half


def test_a_corpus_that_changed_on_disk_is_refused(seed_sweep, tmp_path: Path) -> None:
    runs = copies(seed_sweep, tmp_path / "runs")
    log = runs[4] / "log.jsonl"
    events = read_events(log)
    events[0]["corpus"]["sha256"] = "0" * 64  # the file was edited between two runs
    log.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    code, _, err = run_main("compare", *map(str, runs))
    assert code == 2 and err.count("\n") == 1
    assert f"runs {runs[0].name} and {runs[4].name} were not measured" in err
    assert "corpus sha256 (run_start) differs" in err and "vs 000000000000)" in err


def cut_log(run_dir: Path, pid: int, *end: dict[str, Any]) -> None:
    """The run's log cut after step 2 (no run_end), its process ``pid``, then ``end``."""
    events = read_events(run_dir / "log.jsonl")
    cut = [e for e in events if e["event"] != "run_end" and e.get("step", 0) <= 2]
    cut[0] = {**cut[0], "pid": pid}
    text = "".join(json.dumps(e) + "\n" for e in [*cut, *end])
    (run_dir / "log.jsonl").write_text(text, encoding="utf-8")


def test_unfinished_and_failed_runs_are_left_out_and_listed(seed_sweep, tmp_path) -> None:
    runs = copies(seed_sweep, tmp_path / "runs")
    gone = 2**22 + 12345  # no such process
    cut_log(runs[1], gone, {"event": "run_failed", "step": 2, "error": "boom"})
    cut_log(runs[2], os.getpid())  # its process (this one) is alive: still training
    cut_log(runs[4], gone)  # killed
    code, out, _ = run_main("compare", *map(str, runs))
    assert code == 0
    assert out.rstrip("\n").splitlines()[-1] == (
        f"left out of the statistics: {runs[1].name} (failed), {runs[2].name} (running), "
        f"{runs[4].name} (stopped)"
    )
    data = compare_json(*map(str, runs))
    assert data["left_out"] == [{"run_id": runs[1].name, "reason": "failed"},
                                {"run_id": runs[2].name, "reason": "running"},
                                {"run_id": runs[4].name, "reason": "stopped"}]  # fmt: skip
    assert [g["runs"] for g in data["groups"]] == [[runs[0].name], [runs[3].name, runs[5].name]]
    kept = [logged(runs[i])["val_loss"] for i in (3, 5)]
    mean, std, low, high = mean_std_interval(kept)
    shown = data["groups"][1]["metrics"]["val_loss"]
    assert (shown["mean"], shown["std"]) == pytest.approx((mean, std), rel=1e-12)
    assert (shown["ci_low"], shown["ci_high"]) == pytest.approx((low, high), rel=1e-12)
    assert [c["verdict"] for c in data["comparisons"]] == ["no test (needs 2+ runs in both)"] * 3
    assert len(data["runs"]) == 6  # still side by side in the metrics


def test_baseline_picks_a_group_and_its_errors_are_one_line(seed_sweep) -> None:
    where = ["--sweep", seed_sweep["sweep_id"], "--runs-dir", str(seed_sweep["runs_dir"])]
    data = compare_json(*where, "--baseline", "optimizer.learning_rate=3e-3")
    assert [g["baseline"] for g in data["groups"]] == [False, True]
    assert data["comparisons"][0]["group"] == "optimizer.learning_rate=0.001"
    for choice, message in [
        ("optimizer.lr=1e-3", "--baseline: optimizer.lr: not a key the groups differ in "
         "(they differ in: optimizer.learning_rate)"),
        ("optimizer.learning_rate=0.5", "--baseline: optimizer.learning_rate=0.5: no group has "
         "that value (optimizer.learning_rate: 0.001, 0.003)"),
        ("optimizer.learning_rate", "--baseline: 'optimizer.learning_rate': expected KEY=VALUE"),
    ]:  # fmt: skip
        code, out, err = run_main("compare", *where, "--baseline", choice)
        assert code == 2 and out == "" and err == f"slmkit: error: {message}\n"


def test_baseline_of_several_keys_must_fit_one_group() -> None:
    groups = [Group({"a.lr": lr, "a.layers": n}, []) for lr, n in ((1e-3, 1), (1e-3, 2), (3e-3, 1))]
    with pytest.raises(Exception, match=r"a.lr=0.001 fits 2 groups .*add --baseline KEY=VALUE"):
        pick_baseline(groups, ["a.lr=0.001"])
    assert pick_baseline(groups, ["a.lr=1e-3", "a.layers=2"]) == 1
    assert pick_baseline(groups, []) == 0
    with pytest.raises(Exception, match=r"a.lr=3e-3 a.layers=2: no group has all these values"):
        pick_baseline(groups, ["a.lr=3e-3", "a.layers=2"])


# -- the report and the picture ------------------------------------------------------------


def test_report_holds_the_group_table_and_the_picture_of_means_and_bands(
    seed_sweep, tmp_path: Path
) -> None:
    report, png = tmp_path / "report.html", tmp_path / "curves.png"
    code, _, err = run_main("compare", "--sweep", seed_sweep["sweep_id"], "--runs-dir",
                            str(seed_sweep["runs_dir"]), "--out", str(report),
                            "--png", str(png))  # fmt: skip
    assert code == 0, err
    html = report.read_text(encoding="utf-8")
    assert "<h2>Groups of seeds</h2>" in html
    expected = by_group(seed_sweep)
    mean, std, low, high = mean_std_interval([r["val_loss"] for r in expected[0.001]])
    cells = ["optimizer.learning_rate=0.001 (baseline)", "3", "val_loss", f"{mean:.4f}",
             f"{std:.4f}", f"[{low:.4f}, {high:.4f}]"]  # fmt: skip
    assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in html
    assert "<th>VERDICT</th>" in html and "Welch&#x27;s t-test" in html
    (embedded,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert base64.b64decode(embedded) == png.read_bytes()
    assert 'alt="each group\'s mean training and validation loss"' in html


def test_the_picture_draws_each_groups_mean_and_band(seed_sweep) -> None:
    pytest.importorskip("matplotlib")
    from slmkit.compare import loss_curves_figure
    from slmkit.seed_stats import analyse

    records = [read_run(p) for p in seed_sweep["runs"]]
    figure = loss_curves_figure(records, analyse(records))
    by_step = figure.axes[0]
    (legend,) = figure.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == [
        "mean of 3 seeds\nlearning_rate=0.001",
        "mean of 3 seeds\nlearning_rate=0.003",
    ]
    assert len(by_step.collections) == 2  # one band per group
    expected = by_group(seed_sweep)
    for band, lr in zip(by_step.collections, LEARNING_RATES, strict=True):
        ys = band.get_paths()[0].vertices[:, 1]
        at_4 = [mean_std_interval([r["curve"][4] for r in expected[lr]])[k] for k in (2, 3)]
        assert min(ys) <= at_4[0] + 1e-9 and any(abs(y - at_4[1]) < 1e-9 for y in ys)
    dashed = [line for line in by_step.lines if line.get_linestyle() == "--"]
    assert [list(line.get_xdata()) for line in dashed] == [[2, 4], [2, 4]]
    assert "band: 95% t-interval" in figure._suptitle.get_text()
    # runs of one seed each: the picture of today, one curve per run, no band
    single = [records[0], records[3]]
    figure = loss_curves_figure(single, analyse(single))
    assert not figure.axes[0].collections
    assert [t.get_text().split("\n")[0] for t in figure.legends[0].get_texts()] == [
        r.run_id for r in single
    ]


def test_statistics_need_neither_torch_nor_scipy_until_seeds(seed_sweep) -> None:
    where = f"'--runs-dir', {str(seed_sweep['runs_dir'])!r}"
    script = (
        "import sys; from slmkit.cli import main; "
        f"assert main(['compare', {str(seed_sweep['runs'][0])!r}, {where}]) == 0; "
        "assert 'scipy' not in sys.modules, 'scipy was imported for one run'; "
        f"assert main(['compare', '--sweep', {seed_sweep['sweep_id']!r}, {where}]) == 0; "
        "assert 'scipy.stats' in sys.modules; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
