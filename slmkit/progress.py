"""Console output of a run: a live progress line on a terminal, plain lines elsewhere.

:class:`StepMeter` measures a training run as it goes (loss, tokens per second, ETA) and
reports it: ``train_step`` events in the log, the progress line on the console.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # the console is also used by commands that never import torch
    import torch

    from slmkit.distributed import World
    from slmkit.run import Run
    from slmkit.threads import ThreadCheck


def eval_line(metrics: dict[str, float]) -> str:
    """What an evaluation shows: the validation loss, bits/char, the excess over the floor."""
    line = f"val_loss {metrics['val_loss']:.4f} ({metrics['val_bpc']:.3f} bits/char)"
    if "val_excess" in metrics:
        line += (
            f", {metrics['val_excess']:+.4f} nats/char above the floor {metrics['val_floor']:.4f}"
        )
    return line


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
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            # The reader went away (`slmkit run ... | head`): the run goes on, quietly;
            # log.jsonl has every line it would have shown.
            self.quiet = True

    def say(self, message: str) -> None:
        """Print one line (closing the live progress line first)."""
        if self.quiet:
            return
        if self._line_open:
            self._write("\n")
            self._line_open = False
        self._write(message + "\n")

    def erase_lines(self, count: int) -> None:
        """On a terminal, erase the ``count`` lines above the cursor and go back to the first
        of them (a block of lines redrawn in place)."""
        if self.live and count > 0 and not self.quiet:
            self._write(f"\x1b[{count}F\x1b[J")  # cursor up to its first line, clear below

    def progress(
        self,
        step: int,
        max_steps: int,
        loss: float,
        tokens_per_s: float,
        eta_s: float,
        val_loss: float | None = None,
        val_excess: float | None = None,
    ) -> None:
        """Show step/max, loss, the last validation loss (and its excess over the floor),
        tokens/s and the ETA."""
        if self.quiet:
            return
        val = f" | val {val_loss:.4f}" if val_loss is not None else ""
        if val_excess is not None:
            val += f" (excess {val_excess:+.4f} nats/char)"
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


class StepMeter:
    """The training loss and speed of a run, logged and shown as steps complete.

    The loss is read back from the device only on logging steps (and the first step, so
    progress shows at once): reading it every step would synchronise the device.
    """

    def __init__(
        self,
        console: Console,
        world: World,
        tokens_per_step: int,
        step: int,
        max_steps: int,
        thread_check: ThreadCheck | None = None,
        floor_metrics: Callable[[float], dict[str, float]] | None = None,
    ) -> None:
        self.console, self.world, self.thread_check = console, world, thread_check
        #: val_loss -> val_floor and val_excess (empty for a corpus without a floor)
        self.floor_metrics = floor_metrics or (lambda _loss: {})
        self.tokens_per_step, self.max_steps = tokens_per_step, max_steps
        self.start_step = step
        self.started = self._window_start = time.perf_counter()
        self._window_steps = 0
        #: the latest training loss read back (NaN before the first)
        self.last_loss = float("nan")

    def step_done(
        self,
        run: Run,
        step: int,
        loss: torch.Tensor,
        lr: float,
        log_now: bool,
        val_loss: float | None,
    ) -> dict[str, Any]:
        """Account for one step; the metrics run-event hooks get (``lr``, and on logging
        steps ``train_loss`` and ``tokens_per_s``)."""
        self._window_steps += 1
        if self.thread_check is not None:
            self.thread_check.step_done(run, step)
        metrics: dict[str, Any] = {"lr": lr}
        if not (log_now or step == self.start_step + 1):
            return metrics
        self.last_loss = self.world.mean(loss).item()
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        tokens_per_s = self._window_steps * self.tokens_per_step / elapsed
        self._window_start, self._window_steps = now, 0
        if log_now:
            metrics.update(train_loss=self.last_loss, tokens_per_s=tokens_per_s)
            run.log(
                "train_step",
                step=step,
                train_loss=self.last_loss,
                lr=lr,
                tokens_per_s=round(tokens_per_s, 1),
            )
        per_step = (now - self.started) / (step - self.start_step)
        eta = per_step * (self.max_steps - step)
        excess = None if val_loss is None else self.floor_metrics(val_loss).get("val_excess")
        self.console.progress(
            step, self.max_steps, self.last_loss, tokens_per_s, eta, val_loss, excess
        )
        return metrics

    def totals(self, step: int) -> dict[str, Any]:
        """``elapsed_s`` and the average ``tokens_per_s`` of this process's steps."""
        elapsed = time.perf_counter() - self.started
        trained = (step - self.start_step) * self.tokens_per_step
        return {
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(trained / elapsed, 1) if elapsed > 0 else None,
        }
