"""What a checkpoint holds: the one place that saves, restores and checks a run's state.

A checkpoint is everything a bit-exact resume needs, as tensors and plain values: the
model, optimizer, schedule, data position, update hooks and grad scaler states, every
RNG state, the counters of :class:`TrainState`, and the resolved experiment and tokenizer
(so ``slmkit eval`` and ``sample`` rebuild the model from the file alone). Resuming checks
that the experiment is the same but for :data:`RESUMABLE_CHANGES`, and the world size,
and continues only in a real run folder. A new run may instead take its weights (and its
tokenizer) from a checkpoint: :func:`load_init`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import torch

from slmkit import __version__, checkpoint
from slmkit.components import Tokenizer
from slmkit.config.diff import NOT_HASHED, changed_keys, not_hashed
from slmkit.config.resolve import experiment_from_dict
from slmkit.config.schema import Experiment
from slmkit.distributed import World
from slmkit.errors import CheckpointError, RunError
from slmkit.model import LanguageModel
from slmkit.plugins import PluginManager
from slmkit.progress import Console
from slmkit.run import Run
from slmkit.rundir import is_run_folder
from slmkit.runlog import environment
from slmkit.stepper import Stepper

#: experiment keys a resumed run may change: those ``config_hash`` leaves out, so a resumed
#: run keeps its hash
RESUMABLE_CHANGES = NOT_HASHED


def tokenizer_record(exp: Experiment, tokenizer: Tokenizer) -> dict[str, Any]:
    """What ``tokenizer.json`` and checkpoints hold: the component name and its state."""
    return {"name": exp.tokenizer.name, "state": tokenizer.state_dict()}


@attrs.define
class Resume:
    """A checkpoint to resume from: where it is and what it holds."""

    path: Path
    payload: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        """The run folder the checkpoint belongs to (the resumed run writes there)."""
        return checkpoint.run_dir_of(self.path)

    @property
    def run_id(self) -> str:
        """The run id it was written under."""
        return str(self.payload.get("run_id") or self.run_dir.name)

    @property
    def precision(self) -> str | None:
        """The precision the run computed in (None: a checkpoint from before it was kept)."""
        precision = self.payload.get("precision")
        return None if precision is None else str(precision)


def resume_folder(resume: Path) -> Path:
    """The run folder ``--resume`` continues: ``resume`` itself, or the one its file is in.

    Anything else is refused, naming the path: a resumed run writes into that folder.
    """
    if resume.is_dir():
        folder, inside = resume, True
    else:  # <run folder>/checkpoints/<file>
        file = checkpoint.resolve(resume).resolve()
        folder, inside = file.parent.parent, file.parent.name == "checkpoints"
    if not (inside and is_run_folder(folder)):
        raise CheckpointError(
            f"{resume}: not a run folder nor a checkpoint in one (a run folder holds "
            "experiment.toml, log.jsonl and checkpoints/); --resume continues a run in its "
            f"own folder, --init-from {resume} starts a new run from its weights"
        )
    return folder


def _load_newest(
    source: str | Path, world: World, console: Console, doing: str, *, resuming: bool
) -> tuple[Path, dict[str, Any]]:
    """Rank 0 loads the newest good checkpoint of ``source`` and sends it to every rank."""

    def load() -> tuple[str, dict[str, Any], list[str]]:
        if resuming:
            resume_folder(Path(source))
        path, payload, skipped = checkpoint.load_newest_good(source)
        return str(path), payload, skipped

    name, payload, skipped = world.from_main(load)
    path = Path(name)
    for problem in skipped:
        console.say(f"warning: {problem}; skipping it")
    if skipped:
        console.say(f"{doing} {path}, the newest good checkpoint")
    return path, payload


def load_resume(
    resume: str | Path, exp: Experiment, manager: PluginManager, world: World, console: Console
) -> Resume:
    """The newest good checkpoint of the run folder ``resume`` (or that checkpoint file),
    if its experiment matches ``exp``.

    Under torchrun rank 0 reads it and sends it to the others, so only rank 0's machine
    needs the run folder.
    """
    path, payload = _load_newest(resume, world, console, "resuming from", resuming=True)
    # Resolved again, so keys added (with defaults) since the checkpoint was written do not
    # count as changes.
    saved = experiment_from_dict(payload["experiment"], manager, f"{path} (experiment)")
    changed = [k for k in changed_keys(saved.to_dict(), exp.to_dict()) if not not_hashed(k)]
    if changed:
        raise CheckpointError(
            f"{path}: the experiment differs from the checkpoint's in "
            f"{', '.join(changed)}; only {', '.join(RESUMABLE_CHANGES)} may change"
        )
    step, max_steps = int(payload["step"]), exp.training.max_steps
    if max_steps < step:  # checked before the run folder's files are written again
        raise CheckpointError(
            f"{path}: the checkpoint is at step {step}, past training.max_steps = "
            f"{max_steps}; resume with training.max_steps >= {step} "
            f"(--set training.max_steps=N)"
        )
    saved_ranks = int(payload.get("world_size", 1))
    if saved_ranks != world.world_size:
        raise CheckpointError(
            f"{path}: written by a run of {saved_ranks} rank(s), this one has "
            f"{world.world_size}; resume with the same number of ranks (the global "
            "batch and every rank's RNG state depend on it); slmkit eval and sample read "
            "it in any single process"
        )
    return Resume(path, payload)


@attrs.define
class Init:
    """A checkpoint a new run takes its weights and tokenizer from (``--init-from``)."""

    path: Path
    payload: dict[str, Any]

    def apply(self, model: LanguageModel) -> None:
        """Load the checkpoint's weights into ``model``, whose tensors must match them."""
        theirs, ours = self.payload["model"], model.state_dict()
        mismatched = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
        only_here = [k for k in ours if k not in theirs]
        only_there = [k for k in theirs if k not in ours]
        if mismatched or only_here or only_there:
            if mismatched:
                k = mismatched[0]
                first = f"{k} is {list(theirs[k].shape)} there, {list(ours[k].shape)} here"
            else:
                first = f"{only_here[0]} only here" if only_here else f"{only_there[0]} only there"
            count = len(mismatched) + len(only_here) + len(only_there)
            more = f" (and {count - 1} more tensors)" if count > 1 else ""
            raise CheckpointError(
                f"{self.path}: its model does not fit this experiment's: {first}{more}"
            )
        model.load_state_dict(theirs)


def load_init(
    source: str | Path, exp: Experiment, manager: PluginManager, world: World, console: Console
) -> Init:
    """The newest good checkpoint of ``source`` (a run folder or a file) to start from.

    Its tokenizer must be the experiment's: the weights are indexed by its token ids.
    """
    path, payload = _load_newest(source, world, console, "starting from", resuming=False)
    saved = experiment_from_dict(payload["experiment"], manager, f"{path} (experiment)")
    tokenizer_keys = [
        k
        for k in changed_keys(saved.to_dict(), exp.to_dict())
        if k == "tokenizer" or k.startswith("tokenizer.")
    ]
    if tokenizer_keys:
        raise CheckpointError(
            f"{path}: its tokenizer differs from the experiment's in "
            f"{', '.join(tokenizer_keys)}; --init-from needs the same tokenizer (the "
            "weights are indexed by its token ids)"
        )
    return Init(path, payload)


@attrs.define(eq=False)
class TrainState:
    """The state of a run between steps, and its checkpoints."""

    exp: Experiment
    tokenizer: Tokenizer
    #: the parts whose states a checkpoint holds: model, optimizer, schedule, data
    #: stream, update hooks, grad scaler (and the ranks and device they run on)
    stepper: Stepper
    #: optimizer steps taken
    step: int = 0
    best_val_loss: float | None = None
    last_val_loss: float | None = None

    def record_eval(self, val_loss: float) -> None:
        """Remember a validation loss (the latest, and the best so far of the finite ones)."""
        self.last_val_loss = val_loss
        if not math.isfinite(val_loss):
            return
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = val_loss

    def payload(
        self, run_id: str, rng_per_rank: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Everything a bit-exact resume needs, as tensors and plain values.

        A run under torchrun adds ``world_size`` and ``rng_per_rank`` (every rank's RNG
        states, gathered to rank 0); its model weights are the unwrapped model's.
        """
        parts = self.stepper
        scaler = parts.precision.scaler
        payload = {
            "format": checkpoint.FORMAT_VERSION,
            "slmkit_version": __version__,
            "run_id": run_id,
            "step": self.step,
            "model": self.stepper.model.state_dict(),
            "optimizer": self.stepper.optimizer.state_dict(),
            "schedule": self.stepper.schedule.state_dict()
            if hasattr(self.stepper.schedule, "state_dict")
            else {},
            "data": self.stepper.stream.state_dict(),
            "update_hooks": self.stepper.update_hooks.state_dict()
            if self.stepper.update_hooks
            else [],
            "grad_scaler": scaler.state_dict() if scaler else {},
            "precision": parts.precision.name,  # a resume keeps it, whatever "auto" says
            "rng": checkpoint.rng_state(),
            "experiment": self.exp.to_dict(),
            "tokenizer": tokenizer_record(self.exp, self.tokenizer),
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
            "skipped_steps": self.stepper.skipped_steps,
            "environment": environment(self.stepper.device),
        }
        if self.stepper.world.launched:
            payload["world_size"] = self.stepper.world.world_size
            payload["rng_per_rank"] = rng_per_rank
        return payload

    def restore(self, payload: dict[str, Any], console: Console) -> None:
        """Load a checkpoint's states into the live parts; the RNG states last."""
        self.stepper.model.load_state_dict(payload["model"])
        self.stepper.optimizer.load_state_dict(payload["optimizer"])
        if hasattr(self.stepper.schedule, "load_state_dict") and payload.get("schedule"):
            self.stepper.schedule.load_state_dict(payload["schedule"])
        self.stepper.stream.load_state_dict(payload["data"])
        if self.stepper.update_hooks is not None:
            self.stepper.update_hooks.load_state_dict(payload["update_hooks"])
        scaler = self.stepper.precision.scaler
        if scaler is not None and payload.get("grad_scaler"):
            scaler.load_state_dict(payload["grad_scaler"])
        self.step = int(payload["step"])
        self.stepper.skipped_steps = int(payload.get("skipped_steps", 0))
        self.best_val_loss = payload.get("best_val_loss")
        self.last_val_loss = payload.get("last_val_loss")
        saved_threads = payload.get("environment", {}).get("num_threads")
        if saved_threads is not None and saved_threads != torch.get_num_threads():
            console.say(
                f"warning: the checkpoint was written with {saved_threads} threads, this "
                f"process uses {torch.get_num_threads()}: losses may differ in the last bits"
            )
        if self.stepper.precision.note is not None:  # "auto" would choose another here
            console.say(f"warning: {self.stepper.precision.note}")
        # A run of N ranks saved every rank's RNG state; a single process saved one.
        per_rank = payload.get("rng_per_rank")
        rng = per_rank[self.stepper.world.rank] if per_rank is not None else payload["rng"]
        checkpoint.set_rng_state(rng)  # last: nothing may draw after this

    def save(self, run: Run) -> Path:
        """Write ``step_<N>.pt`` atomically, point ``latest.pt`` at it, prune old ones.

        Under torchrun every rank calls it (their RNG states are gathered) and rank 0
        writes. Logs a ``checkpoint`` event; returns the path.
        """
        folder = run.run_dir / "checkpoints"
        path = folder / f"step_{self.step}.pt"
        bad = self.stepper.model.nonfinite_parameters()  # the same on every rank
        if bad:  # a checkpoint is a promise: never one of a broken model
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise RunError(
                f"non-finite weights at step {self.step} ({bad[0]}{more}): {path} not "
                f"written ({checkpoint.kept_note(run.run_dir)}); "
                'training.on_nonfinite = "skip" would undo such updates instead'
            )
        rngs = (
            self.stepper.world.gather(checkpoint.rng_state())
            if self.stepper.world.launched
            else None
        )

        def write() -> None:
            try:
                checkpoint.atomic_save(self.payload(run.run_id, rngs), path)
                checkpoint.point_latest(path)
            except OSError as exc:  # disk full, permissions...: the previous files are intact
                raise RunError(
                    f"could not write checkpoint {path}: {exc}; {checkpoint.kept_note(run.run_dir)}"
                ) from exc
            checkpoint.prune(folder, self.exp.training.keep_checkpoints)

        self.stepper.world.from_main(write)
        run.log("checkpoint", step=self.step, path=str(path.relative_to(run.run_dir)))
        return path
