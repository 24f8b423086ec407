"""CPU threads: ``training.threads`` applied, and a warning when they outnumber free cores.

torch runs each CPU operation on a pool of threads, one per core by default. When other
processes keep some of those cores busy, the threads of one operation wait for each other
at every step of it, and a run can get several times slower than with fewer threads.
:class:`ThreadCheck` measures the first seconds of a run and says so, once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from slmkit.run import Run


def use_threads(threads: int) -> int:
    """Set torch's CPU threads (0: leave torch's own count); the count before, to restore."""
    import torch

    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    return before


def usable_cores() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def busy_seconds(cores: list[int], stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds the given cores have spent busy (anyone's work) since boot; ``None``
    where ``/proc/stat`` is not there (not Linux)."""
    try:
        lines = stat.read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    wanted, ticks = {f"cpu{c}" for c in cores}, 0
    for line in lines:
        name, *fields = line.split()
        if name in wanted:  # user nice system idle iowait irq softirq steal ...
            values = [int(v) for v in fields[:8]]
            ticks += sum(values) - values[3] - values[4]  # all but idle and iowait
    return ticks / os.sysconf("SC_CLK_TCK")


class ThreadCheck:
    """Warns once when a run's threads wait for cores that other processes keep busy.

    It measures from the end of the first step (which pays one-off costs) until at least
    ``window_s`` seconds and ``min_steps`` steps have passed: the wall time, this process's
    CPU time, and how busy its cores were. It warns when both hold: other processes kept
    so many cores busy that fewer are free than there are threads, and this process got
    less than three quarters of a core per thread. Where the busy time of the cores cannot
    be read (not Linux), the load average stands in for it.
    """

    def __init__(
        self,
        threads: int,
        say: Callable[[str], None],
        *,
        cores: list[int] | None = None,
        window_s: float = 3.0,
        min_steps: int = 3,
        clock: Callable[[], float] = time.perf_counter,
        cpu_time: Callable[[], float] = time.process_time,
        busy: Callable[[], float | None] | None = None,
        load: Callable[[], float | None] | None = None,
    ) -> None:
        self.threads, self.say = threads, say  # say: prints a line (Console.say)
        self.cores = cores if cores is not None else usable_cores()
        self.window_s, self.min_steps = window_s, min_steps
        self.clock, self.cpu_time = clock, cpu_time
        self.busy = busy if busy is not None else lambda: busy_seconds(self.cores)
        self.load = load if load is not None else _load_average
        self._start: tuple[float, float, float | None] | None = None
        self._steps = 0
        #: True once measured (a run is checked once)
        self.done = threads <= 1

    @classmethod
    def on(cls, device: torch.device, say: Callable[[str], None]) -> ThreadCheck | None:
        """The check for a run on ``device`` with torch's current threads (CPU runs only)."""
        import torch

        return cls(torch.get_num_threads(), say) if device.type == "cpu" else None

    def step_done(self, run: Run, step: int) -> None:
        """Count a finished step; at the end of the window, measure and maybe warn."""
        if self.done:
            return
        if self._start is None:
            self._start = (self.clock(), self.cpu_time(), self.busy())
            return
        self._steps += 1
        wall = self.clock() - self._start[0]
        if wall < self.window_s or self._steps < self.min_steps:
            return
        self.done = True
        own = (self.cpu_time() - self._start[1]) / wall  # cores' worth this process got
        busy_now, busy_then = self.busy(), self._start[2]
        if busy_now is not None and busy_then is not None:
            others = (busy_now - busy_then) / wall - own
        else:
            load = self.load()
            if load is None:
                return
            others = load - own
        others = min(max(others, 0.0), float(len(self.cores)))
        free = len(self.cores) - others
        if self.threads <= free + 0.5 or own >= 0.75 * self.threads:
            return
        per_step = wall / self._steps
        run.log("thread_contention", step=step, threads=self.threads, cores=len(self.cores),
                others_busy=round(others, 2), process_cores=round(own, 2),
                seconds_per_step=round(per_step, 4))  # fmt: skip
        fewer = max(1, int(free + 0.5))
        self.say(
            f"warning: {self.threads} CPU threads, but only {free:.1f} of the "
            f"{len(self.cores)} cores are free (other processes keep {others:.1f} busy): "
            f"this run gets {own:.1f} cores ({per_step * 1000:.0f} ms a step) and its "
            "threads wait for each other; fewer "
            f"threads are often much faster: --threads {fewer} (training.threads = {fewer}, "
            f"or OMP_NUM_THREADS={fewer})"
        )


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has none
        return None
