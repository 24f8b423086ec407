"""SIGINT and SIGTERM as a request to stop after the current step.

A run catches both while it trains: the loop finishes the step, saves a checkpoint and
raises :class:`~slmkit.errors.RunInterrupted`, so a stopped run resumes exactly. A second
Ctrl-C stops at once (except under torchrun, which forwards each Ctrl-C to the ranks
that already got it from the terminal).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from slmkit.distributed import World
from slmkit.errors import RunInterrupted
from slmkit.run import Run


def launcher(argv0: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The start of a command line that runs slmkit the way this process was started.

    ``slmkit`` (the console script) or ``python -m slmkit`` (``argv[0]`` is then the
    package's ``__main__.py``), behind ``uv run`` when uv started the process (uv sets
    ``UV`` for what it runs): the README's ``uv run slmkit`` needs no activated
    environment, and a bare ``slmkit`` would fail for its readers.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    environ = os.environ if environ is None else environ
    if Path(argv0).name == "__main__.py":
        python = "python" if shutil.which("python") == sys.executable else sys.executable
        command = f"{shlex.quote(python)} -m slmkit"
    else:
        command = "slmkit"
    return f"uv run {command}" if environ.get("UV") else command


def resume_command(
    source: str,
    overrides: Sequence[str],
    run_dir: Path,
    *,
    torchrun: bool = False,
    argv0: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The command that resumes a run: the experiment and ``--set`` overrides it started
    with, ``--resume`` its folder, launched as this process was (:func:`launcher`)."""
    args = ["run", source, *(a for o in overrides for a in ("--set", o)), "--resume", str(run_dir)]
    tail = shlex.join(args)
    start = launcher(argv0, environ)
    if torchrun:  # its options (ranks, rendezvous) are not ours to know
        uv = "uv run " if start.startswith("uv run ") else ""
        return f"{uv}torchrun <the same options> -m slmkit {tail}"
    return f"{start} {tail}"


class SignalCatcher:
    """SIGINT and SIGTERM go to :meth:`on_signal` inside a ``with`` block; the previous
    handlers come back after. Outside the main thread (which alone may set handlers) it
    catches nothing."""

    def __init__(self) -> None:
        #: the signal received, if any
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self.on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Called with each signal caught; records the first."""
        self.received = self.received or signum


class StopSignals(SignalCatcher):
    """Catches SIGINT/SIGTERM while a run trains: a request to stop after the current step."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """A second Ctrl-C outside torchrun stops at once; else the signal is kept."""
        if self.received is not None and signum == signal.SIGINT and not self.world.launched:
            raise KeyboardInterrupt
        self.received = signum

    def interrupted(
        self, run: Run, step: int, path: Path, experiment: Sequence[str]
    ) -> RunInterrupted:
        """Log ``run_interrupted``; the error that ends the run (exit code 128 + signal).

        ``path`` is the checkpoint saved at ``step``; ``experiment`` the experiment file and
        its ``--set`` overrides, for the command that resumes (:func:`resume_command`).
        """
        assert self.received is not None
        name, code = signal.Signals(self.received).name, 128 + self.received
        run.log("run_interrupted", step=step, signal=name, checkpoint=str(path))
        if not self.world.is_main:
            message = (
                f"{name} at step {step} on rank {self.world.rank}; rank 0 saved the checkpoint"
            )
            return RunInterrupted(message, exit_code=code)
        source, *overrides = experiment
        resume = resume_command(source, overrides, run.run_dir, torchrun=self.world.launched)
        return RunInterrupted(f"{name} at step {step}: saved {path}; resume with: {resume}", code)

    def agreed(self) -> int | None:
        """The signal every rank acts on: one any rank received (a collective read).

        A signal that arrives while the ranks agree is kept for the next call: its handler
        may run inside the collective, after this rank sent "none".
        """
        if not self.world.launched:
            return self.received
        agreed = self.world.max_int(self.received or 0)
        if not agreed:
            return None
        self.received = agreed
        return agreed
