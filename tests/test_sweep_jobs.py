"""``--jobs K``: sweep members as child processes, their console, Ctrl-C, and bit-identity."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_same_parameters, events, losses, merge, run_main, train
from scipy import stats
from test_sweep_seeds import sweep_id_of

from slmkit import sweep_board
from slmkit.config.resolve import load_experiment
from slmkit.progress import Console
from slmkit.runs import list_runs, read_run
from slmkit.sweep_board import MemberProgress, SweepBoard, SweepProgress
from slmkit.sweep_jobs import (
    LogTail,
    NewFolders,
    child_command,
    child_environment,
    child_threads,
    visible_devices,
)
from slmkit.sweep_plan import Member, Sweep

# -- the pieces ------------------------------------------------------------------------------


def test_children_split_the_threads_unless_the_experiment_sets_them(write_experiment, manager):
    path = write_experiment()
    own = Member(0, [], load_experiment(path, manager), [])
    pinned = Member(0, [], load_experiment(path, manager, ["training.threads=3"]), [])
    assert [child_threads(own, 8, jobs) for jobs in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert child_threads(pinned, 8, 2) is None  # the experiment's 3 threads in every child


def test_each_child_gets_one_cuda_device_round_robin(monkeypatch) -> None:
    assert visible_devices({}, 3) == ["0", "1", "2"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "4, 6"}, 2) == ["4", "6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [child_environment(slot, True)["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == [
        "4", "6", "4"
    ]  # fmt: skip
    assert child_environment(1, False)["CUDA_VISIBLE_DEVICES"] == "4,6"  # a CPU run: as is
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert child_environment(1, True)["CUDA_VISIBLE_DEVICES"] == "5"  # one device: shared


def test_a_child_runs_the_member_tagged_with_its_sweep(write_experiment, manager) -> None:
    path = write_experiment()
    exp = load_experiment(path, manager, ["training.threads=1", "model.n_layers=1"])
    member = Member(1, ["model.n_layers=1"], exp, ["training.threads=1", "model.n_layers=1"])
    sweep = Sweep("sweep-x", "-odd.toml", ["model.n_layers"], [member, member], Path("runs"))
    command = child_command(sweep, member, None, "init/run", debug=False)
    tag = {"id": "sweep-x", "index": 1, "size": 2, "overrides": ["model.n_layers=1"]}
    assert command == [
        sys.executable, "-m", "slmkit", "run", "--set=training.threads=1",
        "--set=model.n_layers=1", "--runs-dir=runs", "--init-from=init/run",
        f"--sweep-member={json.dumps(tag)}", "--", "-odd.toml",
    ]  # fmt: skip
    member.resume = Path("runs/r1")
    command = child_command(sweep, member, 2, "init/run", debug=True)
    assert command[3:5] == ["--debug", "run"]
    assert "--threads=2" in command and "--resume=runs/r1" in command
    assert not any(a.startswith("--init-from") for a in command)  # a resume has its weights


def test_log_tail_reads_whole_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    tail = LogTail(log)
    assert tail.new_events() == []  # no log yet
    log.write_bytes(b'{"event": "a"}\n{"event": "b", "st')
    assert tail.new_events() == [{"event": "a"}]
    with open(log, "ab") as f:
        f.write(b'ep": 3}\nnot json\n')
    assert tail.new_events() == [{"event": "b", "step": 3}]


def test_new_run_folders_are_matched_by_their_sweep_tag(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "old").mkdir(parents=True)
    (runs / "old" / "log.jsonl").write_text('{"sweep": {"id": "s", "index": 0}}\n')
    folders = NewFolders(runs, "s")
    for name, first in [
        ("mine", {"sweep": {"id": "s", "index": 1}}),
        ("other", {"sweep": {"id": "t", "index": 0}}),
        ("plain", {"sweep": None}),
    ]:
        (runs / name).mkdir()
        (runs / name / "log.jsonl").write_text(json.dumps(first) + "\n")  # fmt: skip
    (runs / "starting").mkdir()
    (runs / "starting" / "log.jsonl").write_text('{"sweep": {"id": "s", "ind')
    assert folders.found() == {1: runs / "mine"}
    (runs / "starting" / "log.jsonl").write_text('{"sweep": {"id": "s", "index": 2}}\n')
    assert folders.found() == {2: runs / "starting"}  # looked at again once written


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_board_shows_running_members_and_the_sweep_with_an_eta() -> None:
    clock = Clock()
    members = [MemberProgress(i, 3, [f"a={i}", f"experiment.seed={7 + i}"], 10) for i in range(3)]
    out = io.StringIO()
    board = SweepBoard(Console(out), "sweep-x", SweepProgress(members, clock=clock), clock)
    members[0].state = members[1].state = "running"
    members[0].step, members[0].loss = 4, 3.21234
    board.refresh()
    assert out.getvalue() == ""  # a plain console: every PLAIN_INTERVAL seconds
    clock.now = 20.0
    board.refresh()
    assert out.getvalue().splitlines() == [
        "  [1/3] a=0 experiment.seed=7: step 4/10 | loss 3.2123",
        "  [2/3] a=1 experiment.seed=8: starting",
        # 4 steps in 20 s; 6 + 10 + 10 steps left
        "sweep sweep-x: 0/3 finished, 2 running, 1 waiting | ETA 2m10s",
    ]
    clock.now = 40.0
    board.refresh()
    assert len(out.getvalue().splitlines()) == 3  # nothing moved: nothing printed again
    board.event("sweep sweep-x: run 1/3 finished")
    members[0].state, members[0].step = "finished", 10
    members[1].state, members[1].step = "failed", 2
    board.refresh(force=True)
    assert out.getvalue().splitlines()[3:] == [
        "sweep sweep-x: run 1/3 finished",
        "sweep sweep-x: 1/3 finished, 1 failed, 1 waiting | ETA 33s",
    ]


def test_on_a_terminal_the_board_is_redrawn_in_place() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock, out = Clock(), Terminal()
    members = [MemberProgress(0, 1, ["a=1"], 10, state="running")]
    board = SweepBoard(Console(out), "sweep-x", SweepProgress(members, clock=clock), clock)
    clock.now = 1.0
    board.refresh()
    members[0].step = 5
    clock.now = 2.0
    board.refresh()
    board.event("news")
    assert out.getvalue() == (
        "  [1/1] a=1: starting\nsweep sweep-x: 0/1 finished, 1 running | ETA ?\n"
        "\x1b[2F\x1b[J"  # up two lines and clear: the block drawn again
        "  [1/1] a=1: step 5/10\nsweep sweep-x: 0/1 finished, 1 running | ETA 2s\n"
        "\x1b[2F\x1b[Jnews\n"  # an event: the block erased, the line, drawn at the next refresh
    )


# -- sweeps with --jobs ----------------------------------------------------------------------


def corpus(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400, encoding="utf-8")
    return path


def test_jobs_2_runs_members_as_processes_and_a_failing_one_does_not_stop_the_other(
    write_experiment, manager, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(sweep_board, "PLAIN_INTERVAL", 0.0)  # every change, as lines
    good, missing = corpus(tmp_path, "a.txt"), tmp_path / "missing.txt"
    path = write_experiment({"data": {"corpus": "file", "path": str(good)}})
    runs = tmp_path / "runs"
    code, out, err = run_main("run", str(path), "--runs-dir", str(runs), "--threads", "1",
                              "--sweep", f"data.path={missing},{good}", "--jobs", "2")  # fmt: skip
    sweep_id = sweep_id_of(out)
    assert code == 1
    failed, summary = err.splitlines()
    assert failed.startswith(f"sweep {sweep_id}: run 1/2 failed: slmkit: error: ")
    assert "missing.txt" in failed
    assert summary == f"slmkit: error: sweep {sweep_id}: run(s) 1 failed"

    (record,) = list_runs(runs)
    assert record.status == "finished" and record.sweep == {
        "id": sweep_id, "index": 1, "size": 2, "overrides": [f"data.path={good}"]
    }  # fmt: skip
    assert events(record.run_dir, "run_start")[0]["num_threads"] == 1
    lines = out.splitlines()
    assert lines[0] == f"sweep {sweep_id}: 2 runs of {path}, up to 2 at once"
    assert f"sweep {sweep_id}: run 1/2 started: data.path={missing}" in lines
    assert f"sweep {sweep_id}: run 2/2 started: data.path={good}" in lines
    val_loss = events(record.run_dir, "eval")[-1]["val_loss"]
    assert f"sweep {sweep_id}: run 2/2 finished: val_loss {val_loss:.4f} ({record.run_id})" in lines
    member_line = re.compile(r"  \[2/2\] data\.path=\S+: step [1-6]/6 \| loss \d+\.\d{4}$")
    assert any(member_line.match(line) for line in lines), out
    assert f"sweep {sweep_id}: 1/2 finished, 1 failed | ETA 0s" in lines
    # the child's console went to its run folder
    console = (record.run_dir / "console.log").read_text().splitlines()
    assert console[-1].startswith(f"finished {record.run_id} at step 6: val_loss")

    # bit for bit the run of --jobs 1, in this process
    alone = train(path, tmp_path / "alone", manager, ["training.threads=1"])
    assert losses(record.run_dir) == losses(alone)
    assert_same_parameters(record.run_dir, alone)


GRID = ["--sweep", "optimizer.learning_rate=1e-3,3e-3", "--seeds", "3", "--threads", "1"]


def by_index(runs: Path) -> list[Path]:
    return [r.run_dir for r in sorted(list_runs(runs), key=lambda r: r.sweep["index"])]


@pytest.mark.slow
def test_jobs_2_gives_bit_identical_results_to_jobs_1(write_experiment, tmp_path: Path) -> None:
    """The issue's test: 2 learning rates x 3 seeds, --jobs 2 against --jobs 1."""
    path = str(write_experiment())
    results, sweep_ids = {}, {}
    for jobs in ("1", "2"):
        runs = tmp_path / f"jobs{jobs}"
        code, out, err = run_main("run", path, "--runs-dir", str(runs), *GRID, "--jobs", jobs)
        assert code == 0, err
        sweep_ids[jobs] = sweep_id_of(out)
        assert f"sweep {sweep_ids[jobs]}: 6 runs of" in out
        results[jobs] = by_index(runs)
    one, two = results["1"], results["2"]
    assert [read_run(p).sweep["overrides"] for p in one] == [
        [f"optimizer.learning_rate={lr}", f"experiment.seed={seed}"]
        for lr in ("1e-3", "3e-3")
        for seed in (7, 8, 9)
    ]
    assert [read_run(p).sweep for p in one] != [read_run(p).sweep for p in two]  # two sweep ids
    for a, b in zip(one, two, strict=True):
        assert read_run(a).sweep["overrides"] == read_run(b).sweep["overrides"]
        assert losses(a) == losses(b)
        assert [e["val_loss"] for e in events(a, "eval")] == [
            e["val_loss"] for e in events(b, "eval")
        ]
        assert_same_parameters(a, b)
    assert len({tuple(losses(p)) for p in one}) == 6  # the seeds and rates do differ
    # compare groups the --jobs 2 sweep by learning rate; its statistics, from the logs here
    code, out, err = run_main("compare", "--sweep", sweep_ids["2"], "--runs-dir",
                              str(tmp_path / "jobs2"), "--json")  # fmt: skip
    assert code == 0, err
    groups = json.loads(out)["groups"]
    assert [(g["label"], g["n"]) for g in groups] == [
        ("optimizer.learning_rate=0.001", 3), ("optimizer.learning_rate=0.003", 3)
    ]  # fmt: skip
    for group, members in zip(groups, (two[:3], two[3:]), strict=True):
        finals = np.array([events(m, "eval")[-1]["val_loss"] for m in members])
        half = stats.t.ppf(0.975, 2) * finals.std(ddof=1) / np.sqrt(3)
        shown = group["metrics"]["val_loss"]
        assert shown["mean"] == pytest.approx(finals.mean(), rel=1e-12)
        assert shown["std"] == pytest.approx(finals.std(ddof=1), rel=1e-12)
        assert (shown["ci_low"], shown["ci_high"]) == pytest.approx(
            (finals.mean() - half, finals.mean() + half), rel=1e-12
        )


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_resume_sweep_finishes_it_bit_exact(
    write_experiment, manager, tmp_path: Path
) -> None:
    long: dict[str, Any] = {
        "training": {
            "max_steps": 1500,
            "eval_every": 500,
            "log_every": 50,
            "checkpoint_every": 100,
        },
        "sampling": {"every": 0},
    }
    path = write_experiment(merge(long, {}))
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "slmkit", "run", str(path), "--runs-dir", str(runs),
               "--seeds", "2", "--threads", "1", "--jobs", "2"]  # fmt: skip
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until both members saved a checkpoint
        saved = list(runs.glob("*/checkpoints/step_*.pt")) if runs.is_dir() else []
        if len({p.parent.parent for p in saved}) == 2:
            break
        time.sleep(0.2)
    parent.send_signal(signal.SIGINT)
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 130, err
    sweep_id = sweep_id_of(out)
    assert err.splitlines()[-1].startswith("slmkit: stopped by SIGINT: the sweep stopped, 0 of "
                                           "the 2 runs it had to do finished")  # fmt: skip
    resume = err.splitlines()[-1].split("resume it with: ")[1]
    assert resume.endswith(f"--jobs 2 --resume-sweep {sweep_id}")
    stopped = by_index(runs)
    for run_dir in stopped:
        assert read_run(run_dir).status == "stopped"
        assert events(run_dir, "run_interrupted")[0]["signal"] == "SIGINT"

    options = ["--seeds", "2", "--threads", "1", "--jobs", "2", "--resume-sweep", sweep_id]
    code, out, err = run_main("run", str(path), "--runs-dir", str(runs), *options)
    assert code == 0, err
    assert by_index(runs) == stopped  # each continued in its own folder
    for seed, run_dir in zip((7, 8), stopped, strict=True):
        assert read_run(run_dir).status == "finished"
        alone = train(path, tmp_path / f"alone{seed}", manager,
                      [f"experiment.seed={seed}", "training.threads=1"])  # fmt: skip
        assert losses(run_dir) == losses(alone)
        assert_same_parameters(run_dir, alone)
