"""The training loop.

:class:`Trainer` builds every part an experiment names and checks all input *before* a
run folder exists, so bad input leaves nothing behind. :meth:`Trainer.run` then opens
(or, on resume, reopens) the folder and trains. The loop itself is :meth:`Trainer._train`;
each thing it does lives in a part of its own:

    Stepper     one optimizer step (precision, DDP, compile, update hooks)   stepper.py
    Evaluator   the validation loss, forward hooks watching                  evaluate.py
    Probes      measurements on the probes' own inputs, at evaluations       probes.py
    TrainState  what a checkpoint holds: save, restore, resume checks        state.py
    StepMeter   loss, tokens/s and ETA, logged and shown                     progress.py
    StopSignals Ctrl-C / SIGTERM as "stop after this step"                   signals.py
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from slmkit import __version__
from slmkit.build import build_parts, resolve_device
from slmkit.config.schema import Experiment
from slmkit.distributed import World
from slmkit.evaluate import Evaluator, bits_per_char, log_sample
from slmkit.failures import failures_reported
from slmkit.floor import read_floor
from slmkit.flops import apply_max_flops
from slmkit.plugins import PluginManager, RunEvents
from slmkit.progress import Console, StepMeter, eval_line
from slmkit.run import Run
from slmkit.rundir import create_run_dir, runs_folder, write_run_files
from slmkit.runlog import NullLog, RunLog, environment, git_state
from slmkit.signals import StopSignals
from slmkit.state import TrainState, load_init, load_resume, tokenizer_record
from slmkit.stepper import Stepper
from slmkit.threads import ThreadCheck, use_threads


def due(every: int, step: int) -> bool:
    """Whether an interval of ``every`` steps (0: never) ends at ``step``."""
    return bool(every) and step % every == 0


class Trainer:
    """One training run of an experiment, fresh or resumed from a checkpoint."""

    def __init__(
        self,
        exp: Experiment,
        manager: PluginManager,
        source: str,
        *,
        resume: str | Path | None = None,
        init_from: str | Path | None = None,
        runs_dir: str | Path | None = None,
        console: Console | None = None,
        sweep: dict[str, Any] | None = None,
        overrides: Sequence[str] = (),
    ) -> None:
        self.exp, self.manager, self.source = exp, manager, source
        self.sweep = sweep  # {"id", "index", "size", "overrides"} when part of a sweep
        self.overrides = list(overrides)  # the --set values behind exp: the resume hint's
        # Under torchrun only rank 0 talks to the user and writes files.
        self.world = World.from_env()
        # training.max_flops decides max_steps before anything reads it (slmkit/flops.py)
        self.exp, self.budget = apply_max_flops(exp, self.world.world_size)
        self.console = (console or Console()) if self.world.is_main else Console(quiet=True)
        self.runs_dir = runs_folder(runs_dir, exp.experiment.runs_dir)
        self.device = self.world.place(resolve_device(exp.training.device, source), source)
        self.world.join(self.device)
        self.threads_before = use_threads(exp.training.threads)  # before anything computes
        try:
            self._build(resume, init_from)
        except BaseException:
            self.world.leave()
            use_threads(self.threads_before)
            raise

    def _build(self, resume: str | Path | None, init_from: str | Path | None) -> None:
        """Every part of the run; every check of the input happens here."""
        exp, world, device = self.exp, self.world, self.device
        context = (exp, self.manager, world, self.console)
        self.resume = None if resume is None else load_resume(resume, *context)
        self.init = None if init_from is None else load_init(init_from, *context)
        start = self.resume or self.init  # its tokenizer, not one trained again
        saved = None if start is None else start.payload["tokenizer"]["state"]
        floor = read_floor(self.resume.run_dir) if self.resume else None  # computed once
        parts = build_parts(
            exp, device, tokenizer_state=saved, floor=floor, rank=world.rank,
            world_size=world.world_size,
            started_precision=self.resume.precision if self.resume else None,
        )  # every rank builds everything, so every rank refuses the same input  # fmt: skip
        self.tokenizer, self.data, self.model = parts.tokenizer, parts.data, parts.model
        if self.init is not None:
            self.init.apply(self.model)
        # Forward hooks observe (and may write files), probes measure: on rank 0 only.
        self.forward_hooks = parts.forward_hooks if world.is_main else None
        self.probes = parts.probes if world.is_main else None
        self.update_hooks, self.optimizer = parts.update_hooks, parts.optimizer
        self.schedule, precision, self.trackers = parts.schedule, parts.precision, parts.trackers
        self.stepper = Stepper(
            exp, self.model, self.optimizer, self.schedule, self.data.stream, precision,
            world, self.console, self.forward_hooks, self.update_hooks,
        )  # fmt: skip
        self.evaluator = Evaluator(
            self.model, self.data.val_batches, self.data.val_share, world, device,
            precision.autocast, self.forward_hooks,
        )  # fmt: skip
        self.state = TrainState(exp, self.tokenizer, self.stepper)
        # Run-event hooks observe the run: rank 0 calls them, once for the whole run.
        self.events = self.manager.run_events(exp.participants) if world.is_main else RunEvents()
        self.current_step = 0  # the step being computed, for error messages

    @property
    def global_batch(self) -> int:
        """Windows per optimizer step over all ranks: batch x accumulation x ranks."""
        t = self.exp.training
        return t.batch_size * t.grad_accum_steps * self.world.world_size

    def run(self) -> dict[str, Any]:
        """Train to ``training.max_steps``; return the summary logged in ``run_end``.

        SIGINT and SIGTERM end the current step, save a checkpoint and raise
        :class:`RunInterrupted`; a failure raises :class:`RunError` after logging
        ``run_failed``. Checkpoints already written are never touched by either.
        """
        try:
            run = self.open_run()
            if self.resume is not None:
                self.state.restore(self.resume.payload, self.console)
            self.current_step = self.state.step
            with StopSignals(self.world) as self.stop:
                try:
                    with failures_reported(run, self.world, lambda: self.current_step):
                        return self._train(run)
                finally:  # before the signal handlers go back: torchrun may still signal
                    self.console.close()
                    run.logger.close()
                    self.world.leave()
        finally:
            self.world.leave()  # also when the run folder could not be opened
            use_threads(self.threads_before)

    def _train(self, run: Run) -> dict[str, Any]:
        exp, t, state = self.exp, self.exp.training, self.state
        self._start(run)
        tokens_per_step = self.global_batch * exp.model.context_length  # all ranks together
        check = ThreadCheck.on(self.device, self.console.say)  # warns if threads wait for cores
        meter = StepMeter(self.console, self.world, tokens_per_step, state.step, t.max_steps,
                          check, self.data.floor_metrics)  # fmt: skip
        self.model.train()
        while state.step < t.max_steps:
            step = self.current_step = state.step + 1
            last = step == t.max_steps
            log_now = step % t.log_every == 0 or last
            lr = self.stepper.set_lr(state.step)
            loss = self.stepper.step(run, step, log_now)
            state.step = step
            metrics = meter.step_done(run, step, loss, lr, log_now, state.last_val_loss)
            self.events("on_step_end", run=run, step=step, metrics=metrics)
            if due(t.eval_every, step) or last:
                self._evaluate(run)
            if (due(exp.sampling.every, step) or last) and self.world.is_main:
                log_sample(run, step, self.console)
            saved = due(t.checkpoint_every, step) or last
            if saved:
                self.save_checkpoint(run)
            if self.stop.agreed() is not None and not last:  # every rank stops at this step
                self._stop(run, saved)
        summary = {
            "steps": state.step,
            "train_loss": meter.last_loss,
            "val_loss": state.last_val_loss,
            "best_val_loss": state.best_val_loss,
            "skipped_steps": self.stepper.skipped_steps,
            "val_bpc": None if state.last_val_loss is None else self._bpc(state.last_val_loss),
            **meter.totals(state.step),
            "run_dir": str(run.run_dir),
        }
        run.log("run_end", summary=summary)
        self.events("on_run_end", run=run, summary=summary)
        self.console.say(
            f"finished {run.run_id} at step {state.step}: val_loss {state.last_val_loss:.4f}; "
            f"outputs in {run.run_dir}"
        )
        return summary

    def _start(self, run: Run) -> None:
        """Log ``run_start``, say what trains where, start the hooks, call on_run_start."""
        t = self.exp.training
        run.log("run_start", **self._run_start_fields())
        if self.budget is not None:
            self.console.say(self.budget.describe())
        warning = self.data.unknown_warning()
        if warning is not None:
            run.log("data_warning", message=warning)
            self.console.say(f"warning: {warning}")
        self.console.say(
            f"{'resuming' if self.resume else 'run'} {run.run_id}: "
            f"{self.model.n_params:,} parameters on {self.device} "
            f"({self.stepper.precision.label}), "
            f"{len(self.data.splits.train):,} training tokens -> {run.run_dir}"
            + "".join(f"\ntracker {name}: {where}" for name, where in self.trackers.where)
        )
        if self.world.launched:
            self.console.say(
                f"{self.world.world_size} ranks ({self.world.backend}): global batch "
                f"{t.batch_size} per rank x {t.grad_accum_steps} micro-batches x "
                f"{self.world.world_size} ranks = {self.global_batch} windows per step"
            )
        for entry in self._hooks():
            entry.start(run)
        self.events("on_run_start", run=run)

    def _hooks(self) -> list[Any]:
        return [*(self.forward_hooks.hooks if self.forward_hooks else []),
                *(self.update_hooks.hooks if self.update_hooks else []),
                *(self.probes.hooks if self.probes else [])]  # fmt: skip

    def _bpc(self, loss: float) -> float:
        return bits_per_char(loss, self.data.splits.chars_per_token)

    def _evaluate(self, run: Run) -> None:
        step = self.state.step
        val_loss = self.evaluator.loss(run, step)
        metrics = {"val_loss": val_loss, "val_bpc": self._bpc(val_loss),
                   **self.data.floor_metrics(val_loss)}  # fmt: skip
        self.state.record_eval(val_loss)
        run.log("eval", step=step, **metrics)
        if self.probes is not None:  # measured on their own inputs, after the validation
            self.probes.measure(run, step)
        self.console.say(f"step {step}: {eval_line(metrics)}")
        self.events("on_eval", run=run, step=step, metrics=metrics)

    def save_checkpoint(self, run: Run) -> Path:
        """Write the checkpoint of this step (:meth:`TrainState.save`); call on_checkpoint."""
        path = self.state.save(run)
        self.events("on_checkpoint", run=run, step=self.state.step, path=path)
        return path

    def _stop(self, run: Run, saved: bool) -> NoReturn:
        """Save (unless this step just did) and raise :class:`RunInterrupted`."""
        step = self.state.step
        path = run.run_dir / "checkpoints" / f"step_{step}.pt"
        if not saved:
            path = self.save_checkpoint(run)
        raise self.stop.interrupted(run, step, path, [self.source, *self.overrides])

    def open_run(self) -> Run:
        """The run folder (rank 0 creates it; the others learn its run id and path)."""
        exp = self.exp
        log: RunLog | NullLog = NullLog()  # rank 0 writes the log

        def make_folder() -> tuple[str, str]:
            nonlocal log
            if self.resume is not None:
                run_id, run_dir = self.resume.run_id, self.resume.run_dir
            else:
                run_id, run_dir = create_run_dir(self.runs_dir, exp.experiment.name)
            files = (exp.to_toml(), tokenizer_record(exp, self.tokenizer), self.data.floor)
            removed = write_run_files(run_dir, *files)
            if removed:
                self.console.say(f"removed {len(removed)} temporary file(s) of killed writes")
            log = RunLog.open(run_dir / "log.jsonl", run_id, self.trackers)  # trackers: rank 0
            return run_id, str(run_dir)

        run_id, folder = self.world.from_main(make_folder)
        run_dir = Path(folder)
        return Run(run_id, run_dir, exp, self.model, self.tokenizer, self.device, log, self.world)

    def _run_start_fields(self) -> dict[str, Any]:
        exp = self.exp
        return {
            "experiment": exp.experiment.name,
            "source": self.source,
            **git_state(Path.cwd()),
            "config_hash": exp.config_hash,
            "hook_list": [f"{h.kind}:{h.name}" for h in self._hooks()],
            "plugins": self.manager.versions(exp.participants),
            "slmkit_version": __version__,
            **environment(self.device),
            "n_params": self.model.n_params,
            "non_embedding_params": self.model.n_non_embedding_params,
            "seed": exp.experiment.seed,
            **self.stepper.precision.describe(),  # precision, precision_requested
            **self.data.describe(exp.data.corpus),  # corpus, train_tokens, val_tokens
            "max_steps": exp.training.max_steps,
            "max_steps_from_flops": self.budget is not None,
            "resumed_from_step": self.state.step if self.resume is not None else None,
            "init_from": str(self.init.path) if self.init is not None else None,
            "pid": os.getpid(),  # lets `slmkit runs` tell a live run from a killed one
            "sweep": self.sweep,
            "world_size": self.world.world_size,
            "backend": self.world.backend,
            "batch_size_per_rank": exp.training.batch_size,
            "global_batch_size": self.global_batch,
        }
