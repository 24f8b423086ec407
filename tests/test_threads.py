"""CPU threads: `--threads` / `training.threads`, and the warning when they wait for cores."""

from __future__ import annotations

import io
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import events, run_main

from slmkit import threads as threads_module
from slmkit.progress import Console
from slmkit.threads import ThreadCheck


def test_threads_option_sets_logs_and_restores_them(write_experiment, tmp_path) -> None:
    before = torch.get_num_threads()
    path, runs = write_experiment(), tmp_path / "runs"
    code, _, err = run_main("run", str(path), "--runs-dir", str(runs), "--threads", "1",
                            "--set", "training.max_steps=3")  # fmt: skip
    assert code == 0, err
    (run_dir,) = runs.iterdir()
    assert events(run_dir, "run_start")[0]["num_threads"] == 1
    saved = tomllib.loads((run_dir / "experiment.toml").read_text(encoding="utf-8"))
    assert saved["training"]["threads"] == 1
    assert torch.get_num_threads() == before  # the process gets its own count back
    # a resume may change the count (it is not part of what the experiment is)
    code, out, err = run_main("run", str(path), "--resume", str(run_dir), "--threads", "2")
    assert code == 0, err
    assert [e["num_threads"] for e in events(run_dir, "run_start")] == [1, 2]
    assert "the checkpoint was written with 1 threads, this process uses 2" in out
    assert torch.get_num_threads() == before


def test_bad_thread_counts_are_one_line_errors(write_experiment, tmp_path) -> None:
    path = write_experiment()
    code, _, err = run_main("run", str(path), "--runs-dir", str(tmp_path), "--threads", "-1")
    assert (code, err) == (2, "slmkit: error: --threads: must be >= 0 (0: torch's own count)\n")
    code, _, err = run_main("run", str(path), "--runs-dir", str(tmp_path),
                            "--set", "training.threads=-2")  # fmt: skip
    assert code == 2 and err.startswith(f"slmkit: error: {path}: training.threads: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no run folder


class FakeRun:
    def __init__(self) -> None:
        self.logged: list[tuple[str, dict[str, Any]]] = []

    def log(self, event: str, **fields: Any) -> None:
        self.logged.append((event, fields))


class Machine:
    """Made-up clocks: seconds passed, this process's CPU seconds, all cores' busy seconds."""

    def __init__(self, busy: bool = True) -> None:
        self.wall = self.cpu = self.busy_s = 0.0
        self.has_busy = busy

    def advance(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.wall += seconds
        self.cpu += seconds * own_cores
        self.busy_s += seconds * (own_cores + other_cores)

    def check(self, threads: int, console: Console, load: float | None = None) -> ThreadCheck:
        return ThreadCheck(
            threads, console.say, cores=[0, 1], clock=lambda: self.wall, cpu_time=lambda: self.cpu,
            busy=lambda: self.busy_s if self.has_busy else None, load=lambda: load,
        )  # fmt: skip


def drive(machine: Machine, check: ThreadCheck, run: FakeRun, own: float, others: float,
          steps: int = 8) -> None:  # fmt: skip
    for step in range(1, steps + 1):
        machine.advance(4 / 3, own, others)  # every step takes 1.33 s
        check.step_done(run, step)  # type: ignore[arg-type]


def test_threads_waiting_for_busy_cores_are_warned_about_once() -> None:
    out, run, machine = io.StringIO(), FakeRun(), Machine()
    check = machine.check(2, Console(out))
    drive(machine, check, run, own=1.0, others=1.6)
    # measured from the end of step 1 to the end of step 4 (3 steps, 4 s)
    assert out.getvalue() == (
        "warning: 2 CPU threads, but only 0.4 of the 2 cores are free (other processes keep "
        "1.6 busy): this run gets 1.0 cores (1333 ms a step) and its threads wait for each "
        "other; fewer threads are often much faster: --threads 1 (training.threads = 1, or "
        "OMP_NUM_THREADS=1)\n"
    )
    assert run.logged == [("thread_contention", {
        "step": 4, "threads": 2, "cores": 2, "others_busy": 1.6, "process_cores": 1.0,
        "seconds_per_step": 1.3333,
    })]  # fmt: skip


@pytest.mark.parametrize(
    ("threads", "own", "others"),
    [(2, 1.9, 0.1),  # the cores are free: no warning
     (2, 1.6, 1.0),  # others are busy, but the threads still get their cores
     (1, 0.5, 2.0)],  # one thread never waits for another
)  # fmt: skip
def test_no_warning_when_threads_do_not_wait(threads: int, own: float, others: float) -> None:
    out, run, machine = io.StringIO(), FakeRun(), Machine()
    drive(machine, machine.check(threads, Console(out)), run, own=own, others=others)
    assert (out.getvalue(), run.logged) == ("", [])


def test_without_proc_stat_the_load_average_stands_in() -> None:
    out, run, machine = io.StringIO(), FakeRun(), Machine(busy=False)
    drive(machine, machine.check(2, Console(out), load=3.0), run, own=1.0, others=0.0)
    assert "only 0.0 of the 2 cores are free (other processes keep 2.0 busy)" in out.getvalue()
    out, run = io.StringIO(), FakeRun()
    drive(machine, machine.check(2, Console(out), load=None), run, own=1.0, others=0.0)
    assert (out.getvalue(), run.logged) == ("", [])  # nothing to go by: no guess


def test_busy_seconds_reads_the_usable_cores_of_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 100 1 10 500 7 0 2 3 0 0\n"
                    "cpu1 50 0 5 900 0 0 0 0 0 0\ncpu2 1000 0 0 0 0 0 0 0 0 0\n")  # fmt: skip
    hz = threads_module.os.sysconf("SC_CLK_TCK")
    assert threads_module.busy_seconds([0, 1], stat) == (116 + 55) / hz
    assert threads_module.busy_seconds([0], tmp_path / "missing") is None


def test_a_run_whose_threads_wait_warns_on_the_console_and_in_the_log(
    write_experiment, tmp_path, monkeypatch
) -> None:
    # a run of 2 threads whose cores look fully taken by others and that gets a tenth of a
    # core itself (made-up busy and CPU seconds: the machine's real load must not matter)
    start = time.perf_counter()

    def on(device: torch.device, say: Any) -> ThreadCheck:
        return ThreadCheck(torch.get_num_threads(), say, cores=[0, 1], window_s=0.0,
                           busy=lambda: 10 * (time.perf_counter() - start),
                           cpu_time=lambda: 0.1 * (time.perf_counter() - start))  # fmt: skip

    monkeypatch.setattr(ThreadCheck, "on", staticmethod(on))
    path, runs = write_experiment(), tmp_path / "runs"
    code, out, err = run_main("run", str(path), "--runs-dir", str(runs), "--threads", "2")
    assert code == 0, err
    (run_dir,) = runs.iterdir()
    (logged,) = events(run_dir, "thread_contention")
    assert (logged["step"], logged["threads"], logged["cores"]) == (4, 2, 2)
    assert out.count("warning: 2 CPU threads, but only 0.0 of the 2 cores are free") == 1
    assert "--threads 1 (training.threads = 1, or OMP_NUM_THREADS=1)" in out
