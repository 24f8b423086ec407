"""``slmkit runs --watch``: the runs table redrawn in place while runs train.

Every ``--interval`` seconds the run folders are read again and the table drawn over the
previous one from the top-left corner of the terminal: status, steps, losses, tokens/s,
the ETA of each running run and a sparkline of its validation losses, every line cut to
the terminal's width and the table to its height. Ctrl-C (or SIGTERM) quits with exit code
0: it is the way to leave a watch, not a failure. The last table stays on the screen and
the cursor, hidden while drawing, is shown again. ``slmkit.cli`` prints the plain table
once instead when stdout is not a terminal.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TextIO

from slmkit.errors import SlmkitError
from slmkit.progress import format_duration
from slmkit.runs import RunRecord, is_run_dir, newest_first, read_run
from slmkit.runs_table import columns
from slmkit.table import format_table

#: seconds between two redraws when ``--interval`` is not given
DEFAULT_INTERVAL = 2.0
#: the blocks of a sparkline, lowest value first
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
#: how many of a run's latest evaluations its sparkline shows
SPARK_POINTS = 24
#: the terminal's controls: cursor hidden and shown, cursor to the top-left corner, erase
#: to the end of the line, of the screen, and the whole screen
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
HOME, ERASE_LINE_END, ERASE_BELOW, ERASE_SCREEN = "\x1b[H", "\x1b[K", "\x1b[J", "\x1b[2J"
#: the columns of the watched table (ETA and the sparkline come after them)
WATCH_COLUMNS = ("RUN_ID", "EXPERIMENT", "STATUS", "STEPS", "TRAIN_LOSS", "VAL_LOSS",
                 "BEST_VAL", "TOK/S")  # fmt: skip


def sparkline(values: Sequence[float], points: int = SPARK_POINTS) -> str:
    """The last ``points`` values as blocks from ``▁`` (their lowest) to ``█`` (their
    highest); a non-finite value is a space, and values all equal are all ``▁``."""
    shown = list(values)[-points:]
    finite = [v for v in shown if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    top = len(SPARK_BLOCKS) - 1
    return "".join(
        " " if not math.isfinite(v)
        else SPARK_BLOCKS[0] if high == low
        else SPARK_BLOCKS[round((v - low) / (high - low) * top)]
        for v in shown
    )  # fmt: skip


def eta_s(record: RunRecord) -> float | None:
    """Seconds a running run has left: its steps left at its recent step rate (from its
    log's timestamps), or at its tokens/s before two ``train_step`` events tell one."""
    if record.status != "running" or not record.max_steps:
        return None
    rate = record.steps_per_s
    if rate is None and record.tokens_per_s and record.tokens_per_step:
        rate = record.tokens_per_s / record.tokens_per_step
    if not rate or rate <= 0:
        return None
    return max(record.max_steps - record.steps, 0) / rate


def watch_rows(records: Sequence[RunRecord]) -> list[list[str]]:
    """The header and a row per run: the watched columns, ``ETA`` and ``VAL_CURVE``."""
    rows = [[*WATCH_COLUMNS, "ETA", "VAL_CURVE"]]
    for record in records:
        cells, eta = columns(record), eta_s(record)
        rows.append([*(cells[h] for h in WATCH_COLUMNS),
                     "-" if eta is None else format_duration(eta),
                     sparkline(record.val_curve.values) or "-"])  # fmt: skip
    return rows


def running_first(records: Sequence[RunRecord]) -> list[RunRecord]:
    """The running runs first, then the others, each newest first."""
    ordered = newest_first(records)
    return [r for r in ordered if r.status == "running"] + [
        r for r in ordered if r.status != "running"
    ]


def frame(records: Sequence[RunRecord], title: str, width: int, height: int) -> list[str]:
    """The lines of one screen: the title, then the table, running runs first; lines cut to
    ``width - 1`` characters, and rows that do not fit ``height - 1`` lines counted in a
    last line (the cursor waits on the last line, so a full screen would scroll)."""
    lines = [title, ""]
    if records:
        lines += format_table(watch_rows(running_first(records))).splitlines()
    else:
        lines.append("no runs yet")
    room = max(height - 1, 3)
    if len(lines) > room:
        hidden = len(lines) - (room - 1)
        lines = [*lines[: room - 1], f"... {hidden} more runs (a taller terminal shows them)"]
    return [line[: max(width - 1, 1)] for line in lines]


class RunReader:
    """The run folders of ``runs_dir`` (of one sweep, if given), read again on each call.

    Runs that are not running are kept between calls until their files change, so a
    watch over many finished runs reads only the ones still training.
    """

    def __init__(self, runs_dir: str | Path, sweep: str | None = None) -> None:
        self.runs_dir, self.sweep = Path(runs_dir), sweep
        self._kept: dict[Path, tuple[tuple[int, ...], RunRecord]] = {}

    def read(self) -> list[RunRecord]:
        """Every run, newest first; a missing or unlistable folder is a one-line error."""
        if not self.runs_dir.is_dir():
            raise SlmkitError(f"{self.runs_dir}: no such folder of runs")
        try:
            folders = [p for p in self.runs_dir.iterdir() if p.is_dir() and is_run_dir(p)]
        except OSError as exc:
            raise SlmkitError(f"{self.runs_dir}: cannot list the folder: {exc}") from None
        records = [self._record(folder) for folder in folders]
        self._kept = {f: kept for f, kept in self._kept.items() if f in folders}
        if self.sweep is not None:
            records = [r for r in records if (r.sweep or {}).get("id") == self.sweep]
        return newest_first(records)

    def _record(self, folder: Path) -> RunRecord:
        stamp = _stamp(folder)
        kept = self._kept.get(folder)
        if kept is not None and kept[0] == stamp:
            return kept[1]
        record = read_run(folder)
        if record.status != "running":  # a running run's status changes with its process
            self._kept[folder] = (stamp, record)
        return record


def _stamp(folder: Path) -> tuple[int, ...]:
    """The size and modification time of a run's two files (zeros for one missing)."""
    stamp: list[int] = []
    for name in ("log.jsonl", "experiment.toml"):
        try:
            info = (folder / name).stat()
            stamp += [info.st_size, info.st_mtime_ns]
        except OSError:
            stamp += [0, 0]
    return tuple(stamp)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, so it quits as Ctrl-C does (the
    cursor shown again); the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def watch_runs(
    runs_dir: str, sweep: str | None, interval: float | None, stream: TextIO | None = None
) -> int:
    """Redraw the runs table on the terminal ``stream`` every ``interval`` seconds until
    Ctrl-C or SIGTERM; returns the exit code, 0."""
    stream = stream if stream is not None else sys.stdout
    interval = DEFAULT_INTERVAL if interval is None else interval
    reader = RunReader(runs_dir, sweep)
    records = reader.read()  # a missing folder fails here, before the screen is touched
    where = runs_dir + (f" --sweep {sweep}" if sweep else "")
    stream.write(HIDE_CURSOR + HOME + ERASE_SCREEN)
    try:
        with terminate_as_interrupt():
            while True:
                title = f"slmkit runs {where}: every {interval:g}s, Ctrl-C quits"
                title += f"   {time.strftime('%H:%M:%S')}"
                size = shutil.get_terminal_size()
                lines = frame(records, title, size.columns, size.lines)
                stream.write(HOME + "".join(f"{line}{ERASE_LINE_END}\n" for line in lines))
                stream.write(ERASE_BELOW)
                stream.flush()
                time.sleep(interval)
                records = reader.read()
    except KeyboardInterrupt:
        pass
    finally:
        # column 0 and the line erased: the "^C" the terminal echoed goes with it
        stream.write("\r" + ERASE_LINE_END + SHOW_CURSOR)
        stream.flush()
    return 0
