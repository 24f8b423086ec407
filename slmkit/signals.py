"""SIGINT and SIGTERM as a request to stop after the current step.

A run catches both while it trains: the loop finishes the step, saves a checkpoint and
raises :class:`~slmkit.errors.RunInterrupted`, so a stopped run resumes exactly. A second
Ctrl-C stops at once (except under torchrun, which forwards each Ctrl-C to the ranks
that already got it from the terminal).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from slmkit.distributed import World
from slmkit.errors import RunInterrupted
from slmkit.run import Run


class StopSignals:
    """Catches SIGINT/SIGTERM inside a ``with`` block; the previous handlers come back after."""

    def __init__(self, world: World) -> None:
        self.world = world
        #: the signal received, if any
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request_stop)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT and not self.world.launched:
            raise KeyboardInterrupt
        self.received = signum

    def interrupted(self, run: Run, step: int, path: Path, resume: str) -> RunInterrupted:
        """Log ``run_interrupted``; the error that ends the run (exit code 128 + signal).

        ``path`` is the checkpoint saved at ``step``; ``resume`` the command that resumes.
        """
        assert self.received is not None
        name, code = signal.Signals(self.received).name, 128 + self.received
        run.log("run_interrupted", step=step, signal=name, checkpoint=str(path))
        if not self.world.is_main:
            message = (
                f"{name} at step {step} on rank {self.world.rank}; rank 0 saved the checkpoint"
            )
            return RunInterrupted(message, exit_code=code)
        if self.world.launched:
            resume = f"torchrun <the same options> -m {resume}"
        return RunInterrupted(f"{name} at step {step}: saved {path}; resume with: {resume}", code)

    def agreed(self) -> int | None:
        """The signal every rank acts on: one any rank received (a collective read)."""
        if self.world.launched:
            self.received = self.world.max_int(self.received or 0) or None
        return self.received
