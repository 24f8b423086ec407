"""Seeds as a sweep axis, bad sweep input, and resuming a sweep, in this process (--jobs 1)."""

from __future__ import annotations

import os
import re
import shlex
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY, assert_same_parameters, events, losses, merge, run_main, train

import slmkit
from slmkit.config.diff import changed_keys
from slmkit.config.resolve import load_experiment
from slmkit.plugins import PluginManager
from slmkit.runs import list_runs, read_run
from slmkit.sweep import grid, parse_sweeps, seed_axis, seed_values


def sweep_id_of(out: str) -> str:
    return re.search(r"^sweep (sweep-\S+): \d+ runs of", out, re.M).group(1)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root``: relative path -> (size, modification time)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}  # fmt: skip


# -- the seed axis -------------------------------------------------------------------------


def test_seeds_are_the_last_axis_of_the_grid() -> None:
    axes = seed_axis(parse_sweeps(["optimizer.learning_rate=1e-3,2e-3"]), [7, 8, 9])
    assert grid(axes) == [
        [f"optimizer.learning_rate={lr}", f"experiment.seed={seed}"]
        for lr in ("1e-3", "2e-3")
        for seed in (7, 8, 9)
    ]
    assert seed_values(3, [], 7, "x.toml") == [7, 8, 9]  # --seeds N: seed .. seed + N - 1
    assert seed_values(None, [5, 1], 7, "x.toml") == [5, 1]  # experiment.seeds, in order
    assert seed_values(2, [5, 1], 7, "x.toml") == [5, 1]  # --seeds agreeing with the list
    assert seed_values(None, [], 7, "x.toml") == []  # no seed axis


def test_seeds_without_sweep_make_one_sweep_differing_only_in_the_seed(
    write_experiment, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    code, out, err = run_main("run", str(write_experiment()), "--runs-dir", str(runs),
                              "--seeds", "2")  # fmt: skip
    assert code == 0, err
    sweep_id = sweep_id_of(out)
    assert f"sweep {sweep_id}: 2 runs of" in out
    records = sorted(list_runs(runs), key=lambda r: r.sweep["index"])
    assert [r.sweep for r in records] == [
        {"id": sweep_id, "index": i, "size": 2, "overrides": [f"experiment.seed={7 + i}"]}
        for i in range(2)
    ]
    first, second = (r.experiment for r in records)
    assert changed_keys(first, second) == ["experiment.seed"]
    assert [r.experiment["experiment"]["seed"] for r in records] == [7, 8]
    assert [events(r.run_dir, "run_start")[0]["seed"] for r in records] == [7, 8]
    assert losses(records[0].run_dir) != losses(records[1].run_dir)
    # the table's last column is the seed
    table = out[out.index("RUN_ID") :].splitlines()
    assert table[0].split()[-1] == "experiment.seed"
    assert [row.split()[-1] for row in table[1:3]] == ["7", "8"]


def test_experiment_seeds_run_as_single_runs_of_one_seed(
    write_experiment, manager, tmp_path: Path
) -> None:
    path = write_experiment({"experiment": {"name": "tiny", "seed": 7, "seeds": [11, 3]}})
    runs = tmp_path / "runs"
    code, out, err = run_main("run", str(path), "--runs-dir", str(runs), "--set",
                              "training.max_steps=3")  # fmt: skip
    assert code == 0, err
    assert f"sweep {sweep_id_of(out)}: 2 runs of" in out  # one sweep
    records = sorted(list_runs(runs), key=lambda r: r.sweep["index"])
    assert [r.sweep["overrides"] for r in records] == [
        ["experiment.seed=11"],
        ["experiment.seed=3"],
    ]
    for record, seed in zip(records, (11, 3), strict=True):
        written = (record.run_dir / "experiment.toml").read_text()
        assert "seeds" not in written  # a run of one seed: its experiment.toml runs alone
        single = load_experiment(path, manager, [f"experiment.seed={seed}", "experiment.seeds=[]",
                                                 "training.max_steps=3"])  # fmt: skip
        assert record.config_hash == single.config_hash  # as a plain run of that seed
        assert losses(record.run_dir) == losses(train(path, tmp_path / f"single{seed}", manager, [
            f"experiment.seed={seed}", "experiment.seeds=[]", "training.max_steps=3"]))  # fmt: skip


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "options", "message"),
    [
        ({}, ["--seeds", "0"], "slmkit: error: --seeds: must be >= 1, got 0"),
        ({}, ["--seeds", "-2"], "slmkit: error: --seeds: must be >= 1, got -2"),
        ({}, ["--seeds", "2", "--jobs", "0"], "slmkit: error: --jobs: must be >= 1, got 0"),
        ({"experiment": {"seeds": [3, 4, 3]}}, [],
         "tiny.toml: experiment.seeds: seed 3 is listed twice"),
        ({"experiment": {"seeds": [3, -4]}}, [],
         "tiny.toml: experiment.seeds: seeds must be in [0, 2**63), got -4"),
        ({"experiment": {"seeds": [3, "4"]}}, [], "tiny.toml: experiment.seeds.1: expected an "
         "integer"),
        ({"experiment": {"seeds": [3, 4]}}, ["--seeds", "3"],
         "tiny.toml: experiment.seeds: lists 2 seeds but --seeds asks for 3"),
        ({}, ["--seeds", "2", "--sweep", "experiment.seed=1,2"],
         "--sweep: experiment.seed: swept twice: by --sweep and by the seeds"),
        ({}, ["--sweep", "experiment.seeds=[1],[2]"],
         "--sweep: experiment.seeds: seeds are an axis of their own: use --seeds N"),
        ({}, ["--set", f"experiment.seed={2**63 - 1}", "--seeds", "2"],
         "tiny.toml: experiment.seed: must be < 2**63"),
        ({}, ["--jobs", "2"], "--jobs: nothing to sweep; give --sweep KEY=V1,V2,... or --seeds N"),
        ({}, ["--resume-sweep", "sweep-x"], "--resume-sweep sweep-x: nothing to sweep"),
        ({}, ["--seeds", "2", "--resume-sweep", "sweep-x"],
         "--resume-sweep sweep-x: no runs of that sweep in"),
        ({}, ["--seeds", "2", "--resume", "runs/x"], "cannot be combined with --resume"),
        ({}, ["--sweep-member", "{}"], "--sweep-member: expected the JSON sweep tag"),
        ({}, ["--sweep-member", '{"id": "s", "index": 2, "size": 2, "overrides": []}'],
         "--sweep-member: expected the JSON sweep tag"),
        ({}, ["--seeds", "2", "--sweep-member", '{"id": "s", "index": 0, "size": 2, '
              '"overrides": []}'], "--sweep-member: one run of a sweep"),
    ],
)  # fmt: skip
def test_bad_sweep_input_is_one_line_and_writes_nothing(
    write_experiment, tmp_path: Path, changes: dict[str, Any], options: list[str], message: str
) -> None:
    path = write_experiment(merge({"experiment": TINY["experiment"]}, changes))
    runs = tmp_path / "runs"
    code, out, err = run_main("run", str(path), "--runs-dir", str(runs), *options)
    assert code == 2, out
    assert message in err and len(err.splitlines()) == 1, err
    assert not runs.exists()


# -- resuming a sweep ------------------------------------------------------------------------


class FailOnce:
    """A plugin that fails the run of one seed right after its checkpoint of step 3."""

    def __init__(self, seed: int) -> None:
        self.seed: int | None = seed

    @slmkit.hookimpl
    def on_checkpoint(self, run: Any, step: int) -> None:
        if step == 3 and run.experiment.experiment.seed == self.seed:
            raise RuntimeError("failing on purpose")


def test_a_failed_member_is_reported_and_a_resumed_sweep_runs_only_what_is_unfinished(
    write_experiment, tmp_path: Path, monkeypatch
) -> None:
    fail = FailOnce(seed=7)
    manager = PluginManager(entry_points=False).load()
    manager.add(fail, "fail_once")
    monkeypatch.setattr("slmkit.cli._manager", lambda: manager)
    path = write_experiment({"plugins": {"enable": ["fail_once"]}})
    runs = tmp_path / "runs"
    options = ["run", str(path), "--runs-dir", str(runs), "--seeds", "2", "--threads", "1"]
    code, out, err = run_main(*options)
    sweep_id = sweep_id_of(out)
    # the first member fails after its checkpoint of step 3; the second runs all the same
    assert code == 1
    reported, summary = err.splitlines()
    assert reported.startswith(
        f"sweep {sweep_id}: run 1/2 failed: run event on_checkpoint (plugin 'fail_once') "
        "failed: RuntimeError: failing on purpose at step 3; the last checkpoint, "
    )
    assert summary == f"slmkit: error: sweep {sweep_id}: run(s) 1 failed"
    (failed,) = [r for r in list_runs(runs) if r.sweep["index"] == 0]
    (finished,) = [r for r in list_runs(runs) if r.sweep["index"] == 1]
    assert (failed.status, failed.steps, finished.status) == ("failed", 3, "finished")
    untouched = tree(finished.run_dir)

    # options the sweep was not started with are refused, and change nothing
    before = tree(runs)
    for other, message in [
        (["--seeds", "3"], "that sweep has 2 runs, these options make 3"),
        (["--sweep", "optimizer.learning_rate=1e-3,2e-3"], "its run 1 is experiment.seed=7, "
         "these options make it optimizer.learning_rate=1e-3"),
        (["--seeds", "2", "--set", "model.d_ff=32"], "run 1's experiment differs from "
         f"{failed.run_dir / 'experiment.toml'} in model.d_ff"),
    ]:  # fmt: skip
        code, _, err = run_main(*options[:4], *other, "--resume-sweep", sweep_id)
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert tree(runs) == before

    fail.seed = None
    code, out, err = run_main(*options, "--resume-sweep", sweep_id)
    assert code == 0, err
    assert f"sweep {sweep_id}: 2 runs of {path}, 1 finished already" in out
    assert "run 2/2" not in out  # the finished member is not run again...
    assert tree(finished.run_dir) == untouched  # ...nor its folder touched
    assert len(list(runs.iterdir())) == 2  # the failed member continued in its own folder
    resumed = read_run(failed.run_dir)
    assert resumed.status == "finished" and resumed.steps == 6
    assert events(failed.run_dir, "run_start")[-1]["resumed_from_step"] == 3
    assert events(failed.run_dir, "run_start")[-1]["sweep"] == failed.sweep
    # continued bit for bit: as a run never interrupted
    alone = train(path, tmp_path / "alone", manager, ["experiment.seed=7", "training.threads=1"])
    assert losses(failed.run_dir) == losses(alone)
    assert_same_parameters(failed.run_dir, alone)
    # and the table shows one row per member
    table = out[out.index("RUN_ID") :].splitlines()
    assert [row.split()[2] for row in table[1:3]] == ["finished", "finished"]
    assert not table[3].startswith("20")


def test_a_member_that_never_started_runs_again_on_resume(write_experiment, tmp_path) -> None:
    corpus = tmp_path / "a.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400, encoding="utf-8")
    path = write_experiment({"data": {"corpus": "file", "path": str(corpus)}})
    runs, missing = tmp_path / "runs", tmp_path / "b.txt"
    options = ["run", str(path), "--runs-dir", str(runs), "--sweep",
               f"data.path={missing},{corpus}", "--set", "training.max_steps=3"]  # fmt: skip
    code, out, err = run_main(*options)
    sweep_id = sweep_id_of(out)
    assert code == 1 and f"sweep {sweep_id}: run 1/2 failed: " in err and "b.txt" in err
    (kept,) = list_runs(runs)
    untouched = tree(kept.run_dir)
    missing.write_text("pack my box with five dozen liquor jugs. " * 400, encoding="utf-8")
    code, out, err = run_main(*options, "--resume-sweep", sweep_id)
    assert code == 0, err
    records = sorted(list_runs(runs), key=lambda r: r.sweep["index"])
    assert [(r.sweep["index"], r.status) for r in records] == [(0, "finished"), (1, "finished")]
    assert records[1].run_dir == kept.run_dir and tree(kept.run_dir) == untouched


def test_a_resumed_sweep_trains_its_finished_runs_on_to_a_raised_max_steps(
    write_experiment, tmp_path: Path
) -> None:
    path = write_experiment({})
    runs = tmp_path / "runs"
    options = ["run", str(path), "--runs-dir", str(runs), "--seeds", "2", "--threads", "1"]
    code, out, err = run_main(*options, "--set", "training.max_steps=3")
    assert code == 0, err
    sweep_id = sweep_id_of(out)
    first = {r.sweep["index"]: r.run_dir for r in list_runs(runs)}
    code, out, err = run_main(*options, "--set", "training.max_steps=6", "--resume-sweep", sweep_id)
    assert code == 0, err
    assert f"sweep {sweep_id}: 2 runs of {path}\n" in out  # none finished at 6 steps
    records = list_runs(runs)
    assert {r.sweep["index"]: r.run_dir for r in records} == first  # in their own folders
    assert [(r.status, r.steps) for r in records] == [("finished", 6)] * 2
    for run_dir in first.values():
        assert events(run_dir, "run_start")[-1]["resumed_from_step"] == 3
    # at that max_steps they are done
    code, out, err = run_main(*options, "--set", "training.max_steps=6", "--resume-sweep", sweep_id)
    assert code == 0 and "2 finished already" in out, err


class CtrlC:
    """A plugin that sends this process SIGINT right after the checkpoint of step 3 of one seed."""

    def __init__(self, seed: int) -> None:
        self.seed: int | None = seed

    @slmkit.hookimpl
    def on_checkpoint(self, run: Any, step: int) -> None:
        if step == 3 and run.experiment.experiment.seed == self.seed:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_stops_the_whole_sweep_and_prints_how_to_resume_it(
    write_experiment, tmp_path: Path, monkeypatch
) -> None:
    ctrl_c = CtrlC(seed=7)
    manager = PluginManager(entry_points=False).load()
    manager.add(ctrl_c, "ctrl_c")
    monkeypatch.setattr("slmkit.cli._manager", lambda: manager)
    path = write_experiment({"plugins": {"enable": ["ctrl_c"]}})
    runs = tmp_path / "runs"
    options = ["run", str(path), "--runs-dir", str(runs), "--seeds", "2", "--threads", "1"]
    code, out, err = run_main(*options)
    sweep_id = sweep_id_of(out)
    assert code == 130
    (line,) = err.splitlines()
    assert line.startswith("slmkit: stopped by SIGINT at step 3: saved ")
    printed = shlex.split(line.split("; or the whole sweep: ")[1])
    command = printed[next(i for i, a in enumerate(printed) if a.endswith("slmkit")) + 1 :]
    assert command == ["run", str(path), "--set", "training.threads=1", "--seeds", "2",
                       "--runs-dir", str(runs), "--resume-sweep", sweep_id]  # fmt: skip
    assert "run 2/2" not in out  # the sweep stopped with its first run
    (stopped,) = list_runs(runs)
    assert (stopped.status, stopped.steps) == ("stopped", 3)

    ctrl_c.seed = None
    code, out, err = run_main(*command)  # as printed
    assert code == 0, err
    records = sorted(list_runs(runs), key=lambda r: r.sweep["index"])
    assert [(r.status, r.steps) for r in records] == [("finished", 6), ("finished", 6)]
    assert records[0].run_dir == stopped.run_dir
    alone = train(path, tmp_path / "alone", manager, ["experiment.seed=7", "training.threads=1"])
    assert losses(stopped.run_dir) == losses(alone)


def test_the_resume_hint_keeps_an_empty_runs_dir() -> None:
    # --runs-dir '' is the current folder, for a sweep as for a run: the hint must say so
    from slmkit.arguments import build_parser
    from slmkit.sweep_plan import resume_sweep_command

    args = build_parser().parse_args(["run", "x.toml", "--seeds", "2", "--runs-dir", ""])
    assert "--runs-dir '' --resume-sweep sweep-1" in resume_sweep_command(args, "sweep-1")
