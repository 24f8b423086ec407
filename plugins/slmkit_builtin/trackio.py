"""Built-in tracker ``trackio``: a run streamed to trackio, local-first and wandb-like.

One trackio project per experiment name (option ``project``), one trackio run per slmkit
run (named by its run id; a resumed run continues it), the runs of a sweep grouped by the
sweep id, the resolved experiment as the run's config. It records the scalars, histograms
and texts of :func:`slmkit.tracked_values`, only those its store lacks (a resumed or
exported run feeds events again). trackio keeps its store where ``TRACKIO_DIR`` says
(default ``~/.cache/huggingface/trackio``); it is the ``slmkit[trackio]`` extra, imported
when the run starts.
"""

from __future__ import annotations

import contextlib
import io
import shlex
from collections.abc import Iterator
from typing import Any

import attrs

import slmkit


@attrs.define(frozen=True)
class TrackioOptions:
    """Options of ``trackio``."""

    #: the trackio project ("": the experiment's name)
    project: str = ""


def import_trackio() -> Any:
    """The trackio module; an ImportError saying what to install if it cannot load."""
    try:
        import trackio
    except ImportError as exc:
        raise ImportError(
            f"trackio is not installed ({exc}): pip install 'slmkit[trackio]' "
            "(or uv sync --extra trackio)"
        ) from None
    return trackio


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """trackio's chatter on stdout (project, dashboard hints) kept off the run's console."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class TrackioTracker:
    """Logs a run's tracked values to a trackio run."""

    def __init__(self, options: TrackioOptions) -> None:
        self.options = options
        self.trackio: Any = None
        self.run: Any = None
        self.held: dict[str, int] = {}

    def open(self, run: slmkit.TrackedRun) -> str:
        """Start (or, for a run trackio has seen, continue) the trackio run; say where."""
        trackio = self.trackio = import_trackio()
        project = self.options.project or run.name
        for row in trackio.SQLiteStorage.get_logs(project, run.run_id):
            for key in row.keys() - {"step", "timestamp"}:
                self.held[key] = max(self.held.get(key, -1), int(row["step"]))
        with quiet():
            self.run = trackio.init(
                project=project,
                name=run.run_id,
                group=(run.sweep or {}).get("id"),
                config=run.hparams,
                resume="allow",
                auto_log_cpu=False,
                auto_log_gpu=False,
                embed=False,
            )
        store = trackio.SQLiteStorage.get_project_db_path(project)
        look = f"trackio show --project {shlex.quote(project)}"
        return f"project {project!r}, run {run.run_id}, in {store} (to look: {look})"

    def record(self, event: dict[str, Any]) -> None:
        """Log what the event measured that the store does not hold yet, as one row."""
        values = slmkit.tracked_values(event)
        if values is None:
            return
        new, trackio = values.unrecorded(self.held), self.trackio
        row: dict[str, Any] = dict(new.scalars)
        row.update({tag: trackio.Histogram(v) for tag, v in new.histograms.items()})
        row.update({tag: trackio.Markdown(text) for tag, text in new.texts.items()})
        if row:
            self.run.log(row, step=values.step)
            self.held.update(dict.fromkeys(row, values.step))

    def close(self) -> None:
        """Write what is queued and finish the trackio run."""
        if self.run is None:
            return
        with quiet():
            if self.trackio.context_vars.current_run.get() is self.run:
                self.trackio.finish()  # also forgets it, so no second finish at exit
            else:
                self.run.finish()


@slmkit.hookimpl
def register_trackers(register: slmkit.Register) -> None:
    """Provide ``trackio``."""
    register("trackio", TrackioTracker, options=TrackioOptions)
