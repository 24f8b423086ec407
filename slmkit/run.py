"""The live run, as plugins see it: what run-event hooks and ``start(run)`` receive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from slmkit.components import Tokenizer
from slmkit.config.schema import Experiment
from slmkit.distributed import World
from slmkit.model import LanguageModel
from slmkit.runlog import NullLog, RunLog


@attrs.define(eq=False)
class Run:
    """One training run: its id and folder, what it trains, and its log.

    Plugins read it and call :meth:`log`; they must not replace its attributes.
    """

    run_id: str
    #: the run folder (relative to the working directory when ``experiment.runs_dir`` is)
    run_dir: Path
    experiment: Experiment
    model: LanguageModel
    tokenizer: Tokenizer
    device: torch.device
    #: rank 0's log; under torchrun the other ranks hold a :class:`NullLog`
    logger: RunLog | NullLog
    #: the ranks of the run (a single process: rank 0 of 1)
    world: World = attrs.Factory(World)

    def log(self, event: str, /, **fields: Any) -> None:
        """Append an event to the run's log.jsonl."""
        self.logger.event(event, **fields)
