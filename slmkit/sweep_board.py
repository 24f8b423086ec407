"""What a sweep shows while it runs: its members' progress and the whole sweep's, with an ETA.

:class:`MemberProgress` is one run of the sweep as the console sees it (step, loss, state);
:class:`SweepProgress` adds them up into the sweep's steps and ETA; :class:`SweepBoard`
prints them for ``--jobs K``: a line per running member and one for the sweep, redrawn in
place on a terminal, printed as plain lines every :data:`PLAIN_INTERVAL` seconds elsewhere
(logs, tests), with the members' starts, ends and failures as lines of their own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import attrs

from slmkit.progress import Console, format_duration

#: seconds between two progress blocks when the console is not a terminal
PLAIN_INTERVAL = 10.0
#: seconds between two redraws on a terminal
LIVE_INTERVAL = 0.5


@attrs.define
class MemberProgress:
    """One run of a sweep: where it is in the grid and how far it has trained."""

    index: int  #: its place in the grid, from 0
    size: int  #: the grid's size
    overrides: list[str]  #: its ``KEY=VALUE`` values in the grid
    max_steps: int
    #: the step reached, and the one this process started from (a resumed run's checkpoint)
    step: int = 0
    start_step: int = 0
    loss: float | None = None
    #: waiting, running, finished, failed, stopped or done (finished before this command)
    state: str = "waiting"

    @property
    def name(self) -> str:
        """``run 3/10``: how the console names it (counting from 1)."""
        return f"run {self.index + 1}/{self.size}"

    def line(self) -> str:
        """``[3/10] KEY=V ...: step 120/600 | loss 3.2101`` (``starting`` before its first step)."""
        where = f"[{self.index + 1}/{self.size}] {' '.join(self.overrides)}"
        if not self.step:
            return f"{where}: starting"
        loss = "" if self.loss is None else f" | loss {self.loss:.4f}"
        return f"{where}: step {self.step}/{self.max_steps}{loss}"


@attrs.define
class SweepProgress:
    """The steps of every member added up, and the time the remaining ones should take."""

    members: list[MemberProgress]
    clock: Callable[[], float] = time.monotonic
    started: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.started = self.clock()

    def count(self, *states: str) -> int:
        """How many members are in one of ``states``."""
        return sum(m.state in states for m in self.members)

    def eta_s(self) -> float | None:
        """Seconds until the last member ends, from the steps trained so far by this
        command (``None`` before any): members that ended count as done."""
        trained = sum(m.step - m.start_step for m in self.members if m.state != "done")
        if trained <= 0:
            return None
        left = sum(m.max_steps - m.step for m in self.members if m.state in ("waiting", "running"))
        return (self.clock() - self.started) / trained * left

    def line(self, sweep_id: str) -> str:
        """``sweep ID: 4/10 finished, 2 running, 1 failed | ETA 3m12s``."""
        size, ended = len(self.members), self.count("finished", "done")
        parts = [f"{ended}/{size} finished"]
        for state in ("running", "failed", "stopped", "waiting"):
            if self.count(state):
                parts.append(f"{self.count(state)} {state}")
        eta = self.eta_s()
        timing = "ETA ?" if eta is None else f"ETA {format_duration(eta)}"
        return f"sweep {sweep_id}: {', '.join(parts)} | {timing}"


class SweepBoard:
    """The console of a sweep whose members run as child processes.

    :meth:`event` prints a line (a member started, finished or failed); :meth:`refresh`
    shows the running members and the sweep's line: redrawn in place at most every
    :data:`LIVE_INTERVAL` seconds on a terminal, else printed every :data:`PLAIN_INTERVAL`
    seconds when something moved.
    """

    def __init__(
        self,
        console: Console,
        sweep_id: str,
        progress: SweepProgress,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console, self.sweep_id, self.progress, self.clock = console, sweep_id, progress, clock
        self._drawn = 0  # lines of the live block on screen, to erase before writing
        self._last = clock()
        self._shown: tuple[tuple[int, int], ...] = ()

    def event(self, message: str, *, error: bool = False) -> None:
        """Print one line above the board (``error``: on stderr)."""
        self._erase()
        if error:
            print(message, file=sys.stderr, flush=True)
        else:
            self.console.say(message)

    def refresh(self, *, force: bool = False) -> None:
        """Show the board if it is time (``force``: now)."""
        now = self.clock()
        state = tuple((m.index, m.step) for m in self.progress.members if m.state == "running")
        if self.console.live:
            due = now - self._last >= LIVE_INTERVAL
        else:
            due = now - self._last >= PLAIN_INTERVAL and state != self._shown
        if not (force or due) or self.console.quiet:
            return
        self._last, self._shown = now, state
        self._erase()
        lines = self.lines()
        for line in lines:
            self.console.say(line)
        self._drawn = len(lines) if self.console.live else 0

    def lines(self) -> list[str]:
        """The running members' lines, then the sweep's."""
        running = [m for m in self.progress.members if m.state == "running"]
        return [f"  {m.line()}" for m in running] + [self.progress.line(self.sweep_id)]

    def close(self) -> None:
        """Leave the last board on screen (a terminal's); nothing more to erase."""
        self._drawn = 0

    def _erase(self) -> None:
        self.console.erase_lines(self._drawn)
        self._drawn = 0


def finished_line(member: MemberProgress, val_loss: float | None, run_id: str | None) -> str:
    """``run 3/10 finished: val_loss 4.2056 (RUN_ID)``."""
    loss = "" if val_loss is None else f": val_loss {val_loss:.4f}"
    return f"{member.name} finished{loss}" + (f" ({run_id})" if run_id else "")


def member_names(members: Sequence[MemberProgress]) -> str:
    """``2, 5`` (counting from 1): which members, for a summary line."""
    return ", ".join(str(m.index + 1) for m in members)
