"""``slmkit runs --watch``: the table redrawn in a terminal, its sparkline and ETA, and the
plain table once when stdout is not a terminal."""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import ROOT, TINY, merge, run_main

from slmkit.run_segments import recent_steps_per_s
from slmkit.runs import read_run
from slmkit.runs_watch import (
    ERASE_BELOW,
    HIDE_CURSOR,
    HOME,
    SHOW_CURSOR,
    eta_s,
    frame,
    sparkline,
)

# -- sparkline and ETA -------------------------------------------------------------------


def test_sparkline_scales_the_values_to_their_own_range() -> None:
    assert sparkline([4.0, 3.0, 2.0, 1.0]) == "█▆▃▁"
    assert sparkline([1.0, 8.0]) == "▁█"
    assert sparkline([2.5, 2.5, 2.5]) == "▁▁▁"  # no range: the lowest block
    assert sparkline([1.0, math.nan, 2.0, math.inf]) == "▁ █ "  # non-finite: a gap
    assert sparkline([math.nan]) == " "
    assert sparkline([]) == ""
    # the latest evaluations only: 30 values falling from 30 to 1 show the last 24 (24..1)
    assert sparkline([float(v) for v in range(30, 0, -1)]) == sparkline(
        [float(v) for v in range(24, 0, -1)]
    )
    assert len(sparkline([float(v) for v in range(30)], points=10)) == 10


def stamp(seconds: float) -> str:
    """The log's timestamp ``seconds`` after 2026-01-01 00:00:00 UTC."""
    whole = int(seconds)
    micros = round((seconds - whole) * 1e6)
    return f"2026-01-01T00:{whole // 60:02d}:{whole % 60:02d}.{micros:06d}Z"


def train_step(step: int, at: float, tokens_per_s: float = 1000.0) -> dict[str, Any]:
    return {"event": "train_step", "step": step, "train_loss": 3.0 - step / 1000,
            "tokens_per_s": tokens_per_s, "timestamp": stamp(at)}  # fmt: skip


def test_the_recent_step_rate_comes_from_the_train_steps_of_the_last_minute() -> None:
    start = {"event": "run_start", "timestamp": stamp(0)}
    # 10 steps a second for the first 100 s, then 2 a second: the last minute says 2
    steps = [train_step(10 * s, s) for s in range(1, 101, 10)]
    steps += [train_step(1000 + 2 * s, 100 + s) for s in range(10, 191, 10)]
    assert recent_steps_per_s([start, *steps]) == pytest.approx(2.0)
    # logged further apart than a minute: the latest two tell the rate
    sparse = [train_step(100, 10), train_step(200, 110), train_step(250, 210)]
    assert recent_steps_per_s([start, *sparse]) == pytest.approx(0.5)
    assert recent_steps_per_s([start, train_step(5, 1)]) is None  # one point: no rate
    no_time = {"event": "train_step", "step": 9}
    assert recent_steps_per_s([start, train_step(5, 1), no_time]) is None


def fake_run(runs: Path, name: str, events: list[dict[str, Any]], pid: int | None = None,
             max_steps: int = 1000, minute: int = 0) -> Path:  # fmt: skip
    """A run folder of the tiny experiment whose log holds ``run_start`` then ``events``;
    ``pid``: the process it claims (a live one makes it ``running``)."""
    run_dir = runs / name
    run_dir.mkdir(parents=True)
    experiment = merge(TINY, {"experiment": {"name": name}, "training": {"max_steps": max_steps}})
    (run_dir / "experiment.toml").write_text(tomli_w.dumps(experiment), encoding="utf-8")
    start = {"event": "run_start", "run_id": name, "experiment": name, "max_steps": max_steps,
             "pid": pid if pid is not None else 2**22 + 4321,  # no such process: stopped
             "timestamp": f"2026-01-01T00:{minute:02d}:00.000000Z"}  # fmt: skip
    text = "".join(json.dumps(e) + "\n" for e in [start, *events])
    (run_dir / "log.jsonl").write_text(text, encoding="utf-8")
    return run_dir


def evals(*losses: float) -> list[dict[str, Any]]:
    return [{"event": "eval", "step": 10 * (i + 1), "val_loss": v, "val_bpc": v / math.log(2),
             "timestamp": stamp(i)} for i, v in enumerate(losses)]  # fmt: skip


def test_eta_is_the_steps_left_at_the_recent_step_rate(tmp_path: Path) -> None:
    live = os.getpid()  # this process is alive: the runs below read as running
    paced = fake_run(tmp_path, "paced", [train_step(10, 0), train_step(20, 10)], pid=live)
    assert read_run(paced).status == "running"
    assert eta_s(read_run(paced)) == pytest.approx(980.0)  # 1 step/s, 980 steps left
    # one train_step yet: tokens/s over the tokens of a step (4 windows x 32 tokens = 128)
    first = fake_run(tmp_path, "first", [train_step(10, 0, tokens_per_s=256.0)], pid=live)
    assert eta_s(read_run(first)) == pytest.approx(990 / 2)
    stopped = fake_run(tmp_path, "stopped", [train_step(10, 0), train_step(20, 10)])
    assert read_run(stopped).status == "stopped" and eta_s(read_run(stopped)) is None
    assert eta_s(read_run(fake_run(tmp_path, "nothing", [], pid=live))) is None


def test_a_frame_fits_the_terminal_and_puts_running_runs_first(tmp_path: Path) -> None:
    live = os.getpid()
    for minute in range(6):  # six stopped runs, the newest last
        fake_run(tmp_path, f"old{minute}", evals(3.0, 2.0), minute=minute)
    fake_run(tmp_path, "live", [train_step(10, 0), train_step(20, 10), *evals(4.0, 3.0, 3.5)],
             pid=live, minute=0)  # fmt: skip
    records = [read_run(p) for p in tmp_path.iterdir()]
    lines = frame(records, "TITLE", width=200, height=40)
    assert lines[:2] == ["TITLE", ""]
    header, *rows = lines[2:]
    assert header.split() == ["RUN_ID", "EXPERIMENT", "STATUS", "STEPS", "TRAIN_LOSS",
                              "VAL_LOSS", "BEST_VAL", "TOK/S", "ETA", "VAL_CURVE"]  # fmt: skip
    assert [row.split()[0] for row in rows] == ["live", *(f"old{m}" for m in range(5, -1, -1))]
    assert rows[0].split()[2:] == ["running", "30/1000", "2.9800", "3.5000", "3.0000", "1,000",
                                   "16m10s", "█▁▅"]  # fmt: skip
    assert rows[1].split()[2:] == ["stopped", "20/1000", "-", "2.0000", "2.0000", "-", "-", "█▁"]
    # a small terminal: lines cut to width - 1, rows past height - 1 lines counted
    small = frame(records, "TITLE", width=30, height=7)
    assert len(small) == 6 and max(len(line) for line in small) == 29
    assert small[-1] == "... 5 more runs (a taller ter"
    assert frame([], "TITLE", 80, 24) == ["TITLE", "", "no runs yet"]


# -- the command -------------------------------------------------------------------------


def test_watch_without_a_terminal_prints_the_table_once(tmp_path: Path) -> None:
    fake_run(tmp_path, "done", evals(3.0, 2.0))
    code, out, err = run_main("runs", str(tmp_path), "--watch", "--interval", "0.1")
    assert code == 0
    assert out == run_main("runs", str(tmp_path))[1]  # exactly the plain table
    assert err == "slmkit: --watch needs a terminal: the table is printed once\n"
    assert "\x1b" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--watch", "--json"], "--watch: not with --json (a script polls `slmkit runs --json`)"),
        (["--interval", "1"], "--interval: only with --watch"),
        (["--watch", "--interval", "0"], "--interval: must be > 0 seconds, got 0"),
        (["--watch", "--interval", "-2"], "--interval: must be > 0 seconds, got -2"),
    ],
)
def test_bad_watch_options_are_one_line_errors(tmp_path: Path, args: list[str],
                                               message: str) -> None:  # fmt: skip
    code, out, err = run_main("runs", str(tmp_path), *args)
    assert (code, out, err) == (2, "", f"slmkit: error: {message}\n")


class Terminal:
    """``python -m slmkit ARGS`` on a pseudo-terminal of ``rows`` x ``cols``, its screen
    output collected as it comes."""

    def __init__(self, args: list[str], rows: int = 24, cols: int = 200) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal's size set before slmkit reads it
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "slmkit", *args], env)
        self.output = ""
        self.code: int | None = None

    def _read(self, seconds: float) -> bool:
        """Collect what comes within ``seconds``; False once the terminal closed."""
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child exited and the terminal closed
            return False
        self.output += data.decode("utf-8", errors="replace")
        return bool(data)

    def read_until(self, done: Callable[[str], bool], timeout: float) -> str:
        """Read until ``done(output)``; fails with the output after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done(self.output):
            assert time.monotonic() < deadline, f"timed out; the screen got {self.output!r}"
            assert self._read(0.1), f"the command ended; the screen got {self.output!r}"
        return self.output

    def wait(self, timeout: float) -> int:
        """The exit code, once the command ended (and its output was read)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read(0.05) and self._read(0.05):
                    pass
                self.code = os.waitstatus_to_exitcode(status)
                return self.code
        raise AssertionError(f"still running after {timeout}s; the screen got {self.output!r}")

    def close(self) -> None:
        """Kill the command if it is still running; close the terminal."""
        if self.code is None and os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def last_frame(output: str) -> list[str]:
    """The lines of the latest complete screen, without the terminal's controls."""
    frames = [f for f in output.split(HOME) if ERASE_BELOW in f]
    text = frames[-1].split(ERASE_BELOW)[0]
    return [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in text.splitlines()]


def rows_of(output: str) -> dict[str, list[str]]:
    lines = last_frame(output)
    return {line.split()[0]: line.split()[1:] for line in lines[2:] if line.strip()}


@pytest.mark.parametrize("quit_by", ["ctrl-c", "sigterm"])
def test_watch_redraws_in_place_and_quits_cleanly(tmp_path: Path, quit_by: str) -> None:
    live = os.getpid()
    run_dir = fake_run(tmp_path, "live", [train_step(10, 0), train_step(20, 10),
                                          *evals(3.0, 2.0)], pid=live)  # fmt: skip
    fake_run(tmp_path, "done", evals(2.5, 1.5, 1.0), minute=1)
    terminal = Terminal(["runs", str(tmp_path), "--watch", "--interval", "0.2"], cols=120)
    try:
        terminal.read_until(lambda out: "live" in out and out.count(ERASE_BELOW) >= 1, 60)
        assert terminal.output.startswith(HIDE_CURSOR)
        assert rows_of(terminal.output) == {
            "RUN_ID": ["EXPERIMENT", "STATUS", "STEPS", "TRAIN_LOSS", "VAL_LOSS", "BEST_VAL",
                       "TOK/S", "ETA", "VAL_CURVE"],
            "live": ["live", "running", "20/1000", "2.9800", "2.0000", "2.0000", "1,000",
                     "16m20s", "█▁"],
            "done": ["done", "stopped", "30/1000", "-", "1.0000", "1.0000", "-", "-", "█▃▁"],
        }  # fmt: skip
        title = last_frame(terminal.output)[0]
        assert title.startswith(f"slmkit runs {tmp_path}: every 0.2s, Ctrl-C quits")
        # the run goes on: the next redraws show its new step, evaluation and ETA
        with (run_dir / "log.jsonl").open("a", encoding="utf-8") as log:
            for event in [train_step(40, 20), *evals(3.0, 2.0, 2.5)[2:]]:
                log.write(json.dumps(event) + "\n")
        terminal.read_until(lambda out: "40/1000" in last_frame(out)[3], 30)
        assert rows_of(terminal.output)["live"][2:] == ["40/1000", "2.9600", "2.5000", "2.0000",
                                                        "1,000", "10m40s", "█▁▅"]  # fmt: skip
        assert all(len(line) <= 119 for line in last_frame(terminal.output))
        if quit_by == "ctrl-c":
            os.write(terminal.fd, b"\x03")  # the terminal sends SIGINT
        else:
            os.kill(terminal.pid, signal.SIGTERM)
        assert terminal.wait(30) == 0
    finally:
        terminal.close()
    assert terminal.output.endswith(SHOW_CURSOR)
    assert terminal.output.count(HIDE_CURSOR) == 1 and "Traceback" not in terminal.output


def test_watch_of_a_missing_folder_is_a_one_line_error_and_leaves_the_cursor(
    tmp_path: Path,
) -> None:
    terminal = Terminal(["runs", str(tmp_path / "none"), "--watch"])
    try:
        assert terminal.wait(60) == 2
    finally:
        terminal.close()
    assert terminal.output == f"slmkit: error: {tmp_path / 'none'}: no such folder of runs\r\n"


@pytest.mark.slow
def test_watch_shows_a_real_run_training(tmp_path: Path, write_experiment) -> None:
    experiment = write_experiment({"training": {"max_steps": 100000, "eval_every": 20,
                                                "checkpoint_every": 100000, "log_every": 5},
                                   "sampling": {"every": 0}})  # fmt: skip
    runs = tmp_path / "runs"
    runs.mkdir()
    trainer = Terminal(["run", str(experiment), "--runs-dir", str(runs), "--threads", "1"])
    watch = Terminal(["runs", str(runs), "--watch", "--interval", "0.2"])
    try:
        # a row of the running run, past its second evaluation: steps and a sparkline
        def trained(out: str) -> bool:
            rows = rows_of(out) if ERASE_BELOW in out else {}
            row = next((r for name, r in rows.items() if name != "RUN_ID"), None)
            return row is not None and row[1] == "running" and len(row[-1]) >= 2

        watch.read_until(trained, 120)
        (row,) = [r for name, r in rows_of(watch.output).items() if name != "RUN_ID"]
        step, max_steps = map(int, row[2].split("/"))
        assert step >= 40 and max_steps == 100000
        assert re.fullmatch(r"\d+h\d\dm|\d+m\d\ds|\d+s", row[-2]), row  # an ETA
        assert set(row[-1]) <= set("▁▂▃▄▅▆▇█")
        os.write(watch.fd, b"\x03")
        assert watch.wait(30) == 0 and watch.output.endswith(SHOW_CURSOR)
        os.write(trainer.fd, b"\x03")  # the run stops after its step, with a checkpoint
        assert trainer.wait(120) == 130
    finally:
        watch.close()
        trainer.close()
