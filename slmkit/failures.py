"""A run's failures, reported: logged as ``run_failed``, then raised as one line.

Whatever ends a run under way with an error is logged first, so ``slmkit runs`` shows the
run as failed (not killed), and the error the user sees names the step and what was kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from slmkit import checkpoint
from slmkit.distributed import World
from slmkit.errors import HookFailure, RunError, SlmkitError, first_line
from slmkit.run import Run


@contextlib.contextmanager
def failures_reported(run: Run, world: World, step: Callable[[], int]) -> Iterator[None]:
    """Log a failure inside the block as ``run_failed``; raise it as a one-line error.

    ``step()`` is the step being computed. A plugin's hook failing becomes a
    :class:`RunError` naming it; a lost peer under torchrun, one naming that; a bug is
    logged and re-raised as it is (the command line shows it as an internal error).
    """
    try:
        yield
    except HookFailure as exc:
        message = f"{exc} at step {step()}; {checkpoint.kept_note(run.run_dir)}"
        _log_failed(run, step(), message)
        raise RunError(world.label + message) from exc
    except RunError as exc:
        _log_failed(run, step(), str(exc))
        if world.launched:
            raise RunError(world.label + str(exc)) from exc
        raise
    except SlmkitError:  # RunInterrupted: StopSignals logged it
        raise
    except Exception as exc:
        kept = checkpoint.kept_note(run.run_dir)
        lost = world.lost_contact(exc, step(), kept)
        if lost is None:  # a bug: logged (`slmkit runs` says failed), shown as internal error
            _log_failed(
                run, step(), f"internal error: {type(exc).__name__}: {first_line(exc)}; {kept}"
            )
            raise
        _log_failed(run, step(), str(lost))
        raise lost from None


def _log_failed(run: Run, step: int, error: str) -> None:
    """Log ``run_failed``; a log that cannot be written (a full disk) hides no error."""
    with contextlib.suppress(OSError):
        run.log("run_failed", step=step, error=error)
