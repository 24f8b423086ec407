"""Built-in tracker ``tensorboard``: a run streamed to TensorBoard event files.

The events go to ``<run>/tensorboard/`` (option ``folder``), so ``tensorboard --logdir
runs`` shows every run: the scalars, histograms and texts of :func:`slmkit.tracked_values`
(losses, bits per character, learning rate, tokens per second, hook and probe metrics,
samples), and at the end the resolved experiment as hparams with the final metrics.
torch writes them (``torch.utils.tensorboard``, which needs the ``tensorboard`` package:
the ``slmkit[tensorboard]`` extra), imported when the run starts. A resumed or exported
run writes only the values the folder's event files do not hold yet.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import attrs

import slmkit

#: the tag under which a run's hparams are held (what TensorBoard's hparams view reads)
HPARAMS_TAG = "_hparams_/session_start_info"
#: the suffix ``add_text`` puts after a text's tag
TEXT_SUFFIX = "/text_summary"


def _folder(_instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    path = Path(value)
    if not value or path.is_absolute() or ".." in path.parts:
        raise slmkit.OptionValueError(
            attribute.name, f"must be a folder inside the run folder, got {value!r}"
        )


@attrs.define(frozen=True)
class TensorBoardOptions:
    """Options of ``tensorboard``."""

    #: the folder of the event files, inside the run folder
    folder: str = attrs.field(default="tensorboard", validator=_folder)
    #: seconds between writes of pending events to disk (what TensorBoard can show)
    flush_secs: int = attrs.field(default=10, validator=slmkit.positive)


def summary_writer_class() -> Any:
    """torch's ``SummaryWriter``; an ImportError saying what to install if it cannot load."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(
            f"TensorBoard is not installed ({exc}): pip install 'slmkit[tensorboard]' "
            "(or uv sync --extra tensorboard)"
        ) from None
    return SummaryWriter


def held_steps(folder: Path) -> dict[str, int]:
    """Each tag's last step in the event files of ``folder`` (texts by the tag they were
    given; the hparams as ``hparams``). A torn last record (a killed run) ends its file."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    held: dict[str, int] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                tag = "hparams" if value.tag == HPARAMS_TAG else value.tag.removesuffix(TEXT_SUFFIX)
                held[tag] = max(held.get(tag, -1), event.step)
    return held


class TensorBoardTracker:
    """Writes a run's tracked values to TensorBoard event files."""

    def __init__(self, options: TensorBoardOptions) -> None:
        self.options = options
        self.writer: Any = None
        self.held: dict[str, int] = {}
        self.hparams: dict[str, Any] = {}

    def open(self, run: slmkit.TrackedRun) -> str:
        """Open the run's event folder (a resumed run's: to add what it lacks); say which."""
        writer_class = summary_writer_class()
        folder = run.run_dir / self.options.folder
        self.held = held_steps(folder)
        self.hparams = run.hparams
        self.writer = writer_class(str(folder), flush_secs=self.options.flush_secs)
        return f"{folder} (to look: tensorboard --logdir {shlex.quote(str(folder))})"

    def record(self, event: dict[str, Any]) -> None:
        """Write what the event measured that the folder does not hold yet."""
        import numpy as np

        values = slmkit.tracked_values(event)
        if values is None:
            return
        new, step, writer = values.unrecorded(self.held), values.step, self.writer
        when = values.time  # when it was logged, also when replayed or exported
        for tag, value in new.scalars.items():
            writer.add_scalar(tag, value, step, walltime=when)
        for tag, numbers in new.histograms.items():
            writer.add_histogram(tag, np.asarray(numbers, dtype=np.float64), step, walltime=when)
        for tag, text in new.texts.items():
            writer.add_text(tag, text, step, walltime=when)
        if values.final and "hparams" not in self.held:  # TensorBoard reads a run's first
            self._hparams(values.scalars, step, when)
        for tag in new.tags:
            self.held[tag] = step

    def _hparams(self, final: dict[str, float], step: int, when: float | None) -> None:
        """The experiment and its final metrics, for the hparams view, in this run's folder
        (``add_hparams`` would write them to a run of their own). Once: a run trained on
        after it finished shows its latest ``final/...`` values beside the first hparams."""
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(self.hparams, final):
            self.writer.file_writer.add_summary(summary, step, when)
        self.held["hparams"] = step

    def close(self) -> None:
        """Write what is pending and close the files."""
        if self.writer is not None:
            self.writer.close()


@slmkit.hookimpl
def register_trackers(register: slmkit.Register) -> None:
    """Provide ``tensorboard``."""
    register("tensorboard", TensorBoardTracker, options=TensorBoardOptions)
