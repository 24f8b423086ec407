"""Console output of a run: a live progress line on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``; ``3700`` -> ``"1h01m"``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Console:
    """Prints a run's progress to ``stream``.

    On a terminal the progress line is redrawn in place; otherwise (CI logs, pipes) it is
    printed as a plain line at most every ``plain_interval`` seconds.
    """

    def __init__(
        self, stream: TextIO | None = None, *, quiet: bool = False, plain_interval: float = 5.0
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self.live = self.stream.isatty()
        self.plain_interval = plain_interval
        self._last_plain = float("-inf")
        self._line_open = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def say(self, message: str) -> None:
        """Print one line (closing the live progress line first)."""
        if self.quiet:
            return
        if self._line_open:
            self._write("\n")
            self._line_open = False
        self._write(message + "\n")

    def progress(
        self,
        step: int,
        max_steps: int,
        loss: float,
        tokens_per_s: float,
        eta_s: float,
        val_loss: float | None = None,
    ) -> None:
        """Show step/max, loss, the last validation loss, tokens/s and the ETA."""
        if self.quiet:
            return
        val = f" | val {val_loss:.4f}" if val_loss is not None else ""
        line = (
            f"step {step}/{max_steps} | loss {loss:.4f}{val} | {tokens_per_s:,.0f} tok/s"
            f" | ETA {format_duration(eta_s)}"
        )
        if self.live:
            self._write("\r\x1b[2K" + line)
            self._line_open = True
            return
        now = time.monotonic()
        if now - self._last_plain >= self.plain_interval or step == max_steps:
            self._last_plain = now
            self._write(line + "\n")

    def close(self) -> None:
        """End the live line, if one is open."""
        if self._line_open:
            self._write("\n")
            self._line_open = False
