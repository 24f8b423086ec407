"""The training loop: steps, evaluation, samples, checkpoints, run events.

:class:`Trainer` builds everything an experiment names and checks the data *before* a run
folder exists, so bad input leaves nothing behind; :meth:`Trainer.run` then creates (or,
on resume, reopens) the folder and trains.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from slmkit import __version__, checkpoint
from slmkit.build import (
    build_model,
    build_optimizer,
    build_schedule,
    build_tokenizer,
    read_experiment_corpus,
    resolve_device,
)
from slmkit.components import Tokenizer
from slmkit.data import BatchStream, Splits, prepare_splits, rank_share, validation_batches
from slmkit.distributed import World, first_line, is_lost_peer
from slmkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    HookFailure,
    RunError,
    RunInterrupted,
)
from slmkit.experiment import Experiment, changed_keys, experiment_from_dict
from slmkit.hooks import EnabledHook, ForwardHooks, UpdateHooks, select_points
from slmkit.model import LanguageModel
from slmkit.options import OptionValueError
from slmkit.plugins import PluginManager
from slmkit.progress import Console
from slmkit.runlog import NullLog, RunLog, environment, git_state, new_run_id

#: experiment keys a resumed run may change
RESUMABLE_CHANGES = ("training.max_steps",)


@attrs.define(eq=False)
class Run:
    """The live run, as run-event hooks see it."""

    run_id: str
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


def tokenizer_record(exp: Experiment, tokenizer: Tokenizer) -> dict[str, Any]:
    """What ``tokenizer.json`` and checkpoints hold: the component name and its state."""
    return {"name": exp.tokenizer.name, "state": tokenizer.state_dict()}


@torch.no_grad()
def loss_sum(
    model: LanguageModel,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over the target tokens (float64), and their count."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for x, y in batches:
        _, loss = model(x.to(device), y.to(device))
        assert loss is not None
        total += loss.double() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total, count


def evaluate(
    model: LanguageModel,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> float:
    """Mean next-token cross-entropy (nats per token) over fixed validation batches."""
    total, count = loss_sum(model, batches, device)
    return float(total / count)


def bits_per_char(loss: float, chars_per_token: float) -> float:
    """Nats per token -> bits per character, comparable across tokenizers."""
    return loss / math.log(2) / chars_per_token


def sample_text(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float,
    seed: int,
    device: torch.device,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
) -> str:
    """Sample a continuation of ``prompt`` with a generator of its own, seeded by ``seed``."""
    ids = tokenizer.encode(prompt) or [tokenizer.pad_id or 0]
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k or None,
        top_p=top_p,
        generator=generator,
        use_cache=use_cache,
    )
    return tokenizer.decode(out[0, len(ids) :].tolist())


class Trainer:
    """One training run of an experiment, fresh or resumed from a checkpoint."""

    def __init__(
        self,
        exp: Experiment,
        manager: PluginManager,
        source: str,
        *,
        resume: str | Path | None = None,
        runs_dir: str | Path | None = None,
        console: Console | None = None,
        sweep: dict[str, Any] | None = None,
    ) -> None:
        self.exp, self.manager, self.source = exp, manager, source
        self.sweep = sweep  # {"id", "index", "size", "overrides"} when part of a sweep
        # Under torchrun only rank 0 talks to the user and writes files.
        self.world = World.from_env()
        self.console = (console or Console()) if self.world.is_main else Console(quiet=True)
        self.runs_dir = Path(runs_dir if runs_dir is not None else exp.experiment.runs_dir)
        self.device = self.world.place(resolve_device(exp.training.device, source), source)
        self.world.join(self.device)
        try:
            self._build(resume)
        except BaseException:
            self.world.leave()
            raise

    def _build(self, resume: str | Path | None) -> None:
        """Everything the run needs; every check of the input happens here."""
        exp, manager, source = self.exp, self.manager, self.source
        self.resume_path: Path | None = None
        payload = self._checkpoint_to_resume(resume) if resume is not None else None

        self.tokenizer = build_tokenizer(exp, manager)
        if payload is not None:
            self.tokenizer.load_state_dict(payload["tokenizer"]["state"])
        text = read_experiment_corpus(exp, manager)
        try:
            self.splits: Splits = prepare_splits(
                text,
                self.tokenizer,
                exp.data.val_fraction,
                exp.model.context_length,
                train_tokenizer=payload is None,
            )
        except DataError as exc:
            raise ConfigError(source, "data", str(exc)) from None

        seed = exp.experiment.seed
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # Every rank seeds alike, so the models start identical and the RNG streams stay in
        # step: an update hook that draws noise (grad_noise) draws the same on every rank.
        self.model = build_model(exp, manager, self.tokenizer).to(self.device)
        self.autocast_dtype, self.scaler = self._precision()
        t, world = exp.training, self.world
        self.stream = BatchStream(
            self.splits.train, exp.model.context_length, t.batch_size, seed,
            rank=world.rank, world_size=world.world_size,
        )  # fmt: skip
        # The validation set is eval_batches global batches; each rank evaluates its share.
        self.val_batches = validation_batches(
            self.splits.val,
            exp.model.context_length,
            t.batch_size * world.world_size,
            t.eval_batches,
        )
        self._check_world_fits_data()
        self.val_share = rank_share(self.val_batches, world.rank, world.world_size)
        # DDP wraps the model for training passes only; evaluation, sampling, hooks and
        # checkpoints use the model itself (so state dicts have no "module." prefix).
        self.ddp: DistributedDataParallel | None = None
        if world.launched:
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self._train_module: torch.nn.Module = self.ddp if self.ddp is not None else self.model
        self.compiled: Any = torch.compile(self._train_module) if t.compile else None
        self._compile_ok = False
        self._run: Run | None = None
        forward_hooks = self._forward_hooks()  # built on every rank: same errors everywhere
        # Forward hooks observe (and may write files): on rank 0 only, seeing its share.
        self.forward_hooks = forward_hooks if world.is_main else None
        self.update_hooks = self._update_hooks()
        self.optimizer = build_optimizer(exp, manager, self.model)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.schedule = build_schedule(exp, manager)
        self.step = 0
        self.skipped_steps = 0
        self.best_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self._payload = payload
        self._current_step = self.step  # the step being computed, for error messages
        # Run-event hooks observe the run: rank 0 calls them, once for the whole run.
        self._event = {
            name: manager.event_caller(name, exp.participants) if world.is_main else _ignore
            for name in ("on_run_start", "on_step_end", "on_eval", "on_checkpoint", "on_run_end")
        }

    def _check_world_fits_data(self) -> None:
        """Under torchrun: a global batch of distinct windows, validation for every rank."""
        ranks = self.world.world_size
        if ranks == 1:
            return
        t, window = self.exp.training, self.exp.model.context_length + 1
        n_train, n_val = self.stream.n_windows, len(self.splits.val) // window
        if n_train < t.batch_size * ranks:
            raise ConfigError(
                self.source, "training.batch_size",
                f"{t.batch_size} windows per rank x {ranks} ranks = {t.batch_size * ranks} "
                f"windows per global batch, but the training split has only {n_train} windows "
                f"of {window} tokens; use fewer ranks, a smaller batch_size or a larger corpus",
            )  # fmt: skip
        if n_val < ranks:
            raise ConfigError(
                self.source, "data.val_fraction",
                f"the validation split has {n_val} window(s) of {window} tokens, fewer than "
                f"the {ranks} ranks that share it; use fewer ranks, a larger val_fraction or "
                "a larger corpus",
            )  # fmt: skip

    def _checkpoint_to_resume(self, resume: str | Path) -> dict[str, Any]:
        """The newest good checkpoint of ``resume``, if its experiment matches this one.

        Under torchrun rank 0 reads it and sends it to the others, so only rank 0's
        machine needs the run folder.
        """

        def load() -> tuple[str, dict[str, Any], list[str]]:
            path, payload, skipped = checkpoint.load_newest_good(resume)
            return str(path), payload, skipped

        path, payload, skipped = self.world.from_main(load)
        self.resume_path = Path(path)
        for problem in skipped:
            self.console.say(f"warning: {problem}; skipping it")
        if skipped:
            self.console.say(f"resuming from {self.resume_path}, the newest good checkpoint")
        # Resolved again, so keys added (with defaults) since the checkpoint was written do
        # not count as changes.
        saved = experiment_from_dict(
            payload["experiment"], self.manager, f"{self.resume_path} (experiment)"
        )
        changed = [
            k
            for k in changed_keys(saved.to_dict(), self.exp.to_dict())
            if k not in RESUMABLE_CHANGES
        ]
        if changed:
            raise CheckpointError(
                f"{self.resume_path}: the experiment differs from the checkpoint's in "
                f"{', '.join(changed)}; only {', '.join(RESUMABLE_CHANGES)} may change"
            )
        saved_ranks = int(payload.get("world_size", 1))
        if saved_ranks != self.world.world_size:
            raise CheckpointError(
                f"{self.resume_path}: written by a run of {saved_ranks} rank(s), this one has "
                f"{self.world.world_size}; resume with the same number of ranks (the global "
                "batch and every rank's RNG state depend on it); slmkit eval and sample read "
                "it in any single process"
            )
        return payload

    def _precision(self) -> tuple[torch.dtype | None, Any]:
        """The autocast dtype (None for fp32) and, for fp16, a gradient scaler."""
        precision = self.exp.training.precision
        if precision == "fp32":
            return None, None
        if precision == "bf16":
            return torch.bfloat16, None
        if self.device.type != "cuda":
            raise ConfigError(
                self.source, "training.precision",
                f'"fp16" needs a CUDA device (this run is on {self.device}); use "bf16"',
            )  # fmt: skip
        return torch.float16, torch.amp.GradScaler("cuda")

    # -- hooks ---------------------------------------------------------------------------

    def _build_hook(self, kind: str, section: Any, key: str) -> EnabledHook:
        component = self.manager.component(kind, section.name, self.exp.participants)
        try:
            hook = component.factory(section.options)
        except OptionValueError as exc:
            raise ConfigError(self.source, f"{key}.{exc.key}", exc.message) from None
        return EnabledHook(kind, section.name, component.plugin, hook, getattr(section, "every", 1))

    def _forward_hooks(self) -> ForwardHooks | None:
        """The enabled ``[[forward_hooks]]``, each with the hook points its globs select."""
        enabled = []
        names = list(self.model.hook_points)
        for i, section in enumerate(self.exp.forward_hooks):
            if not section.enabled:
                continue  # left out entirely: nothing is attached
            entry = self._build_hook("forward_hook", section, f"forward_hooks.{i}")
            patterns = section.points or list(entry.hook.default_points)
            for pattern, matched in select_points(names, patterns).items():
                if not matched:
                    raise ConfigError(
                        self.source, f"forward_hooks.{i}.points",
                        f"{pattern!r} matches no hook point of this model (docs/hooks.md "
                        f"lists them; e.g. {', '.join(names[:3])}, ...)",
                    )  # fmt: skip
                entry.points += [m for m in matched if m not in entry.points]
            enabled.append(entry)
        return ForwardHooks(enabled, self.model.hook_points) if enabled else None

    def _update_hooks(self) -> UpdateHooks | None:
        """The enabled ``[[update_hooks]]``, in order."""
        enabled = [
            self._build_hook("update_hook", section, f"update_hooks.{i}")
            for i, section in enumerate(self.exp.update_hooks)
            if section.enabled
        ]
        parameters = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return UpdateHooks(enabled, parameters) if enabled else None

    def _all_hooks(self) -> list[EnabledHook]:
        return [*(self.forward_hooks.hooks if self.forward_hooks else []),
                *(self.update_hooks.hooks if self.update_hooks else [])]  # fmt: skip

    # -- the run folder ------------------------------------------------------------------

    def _open_run(self) -> Run:
        """The run folder (rank 0 creates it; the others learn its run id and path)."""
        run_id, folder = self.world.from_main(self._make_run_folder)
        run_dir = Path(folder)
        return Run(
            run_id=run_id,
            run_dir=run_dir,
            experiment=self.exp,
            model=self.model,
            tokenizer=self.tokenizer,
            device=self.device,
            logger=RunLog(run_dir / "log.jsonl", run_id) if self.world.is_main else NullLog(),
            world=self.world,
        )

    def _make_run_folder(self) -> tuple[str, str]:
        payload = self._payload
        if payload is not None and self.resume_path is not None:
            run_dir = checkpoint.run_dir_of(self.resume_path)
            run_id = str(payload.get("run_id") or run_dir.name)
        else:
            run_id, run_dir = self._new_run_dir()
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        _write_text_atomic(run_dir / "experiment.toml", self.exp.to_toml())
        record = tokenizer_record(self.exp, self.tokenizer)
        _write_text_atomic(run_dir / "tokenizer.json", json.dumps(record, indent=1) + "\n")
        return run_id, str(run_dir)

    def _new_run_dir(self) -> tuple[str, Path]:
        """A fresh folder under ``runs_dir``; a taken name (same second, same random
        digits) is drawn again rather than reused."""
        for _ in range(8):
            run_id = new_run_id(self.exp.experiment.name)
            run_dir = self.runs_dir / run_id
            try:
                run_dir.mkdir(parents=True, exist_ok=False)
            except FileExistsError:
                continue
            except OSError as exc:
                raise RunError(f"cannot create the run folder {run_dir}: {exc}") from None
            return run_id, run_dir
        raise RunError(f"cannot find a free run folder name in {self.runs_dir}")

    def _restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if hasattr(self.schedule, "load_state_dict") and payload.get("schedule"):
            self.schedule.load_state_dict(payload["schedule"])
        self.stream.load_state_dict(payload["data"])
        if self.update_hooks is not None:
            self.update_hooks.load_state_dict(payload["update_hooks"])
        if self.scaler is not None and payload.get("grad_scaler"):
            self.scaler.load_state_dict(payload["grad_scaler"])
        self.step = int(payload["step"])
        self.skipped_steps = int(payload.get("skipped_steps", 0))
        self.best_val_loss = payload.get("best_val_loss")
        self.last_val_loss = payload.get("last_val_loss")
        saved_threads = payload.get("environment", {}).get("num_threads")
        if saved_threads is not None and saved_threads != torch.get_num_threads():
            self.console.say(
                f"warning: the checkpoint was written with {saved_threads} threads, this "
                f"process uses {torch.get_num_threads()}: losses may differ in the last bits"
            )
        # A run of N ranks saved every rank's RNG state; a single process saved one.
        per_rank = payload.get("rng_per_rank")
        rng = per_rank[self.world.rank] if per_rank is not None else payload["rng"]
        checkpoint.set_rng_state(rng)  # last: nothing may draw after this

    def _run_start_fields(self) -> dict[str, Any]:
        exp = self.exp
        hook_list = [f"{h.kind}:{h.name}" for h in self._all_hooks()]
        corpus = {
            "name": exp.data.corpus,
            "sha256": self.splits.corpus_sha256,
            "chars": self.splits.n_chars,
        }
        return {
            "experiment": exp.experiment.name,
            "source": self.source,
            **git_state(Path.cwd()),
            "config_hash": exp.config_hash,
            "hook_list": hook_list,
            "plugins": self.manager.versions(exp.participants),
            "slmkit_version": __version__,
            **environment(self.device),
            "n_params": self.model.n_params,
            "seed": exp.experiment.seed,
            "corpus": corpus,
            "train_tokens": len(self.splits.train),
            "val_tokens": len(self.splits.val),
            "max_steps": exp.training.max_steps,
            "resumed_from_step": self.step if self._payload is not None else None,
            "pid": os.getpid(),  # lets `slmkit runs` tell a live run from a killed one
            "sweep": self.sweep,
            "world_size": self.world.world_size,
            "backend": self.world.backend,
            "batch_size_per_rank": exp.training.batch_size,
            "global_batch_size": self._global_batch,
        }

    @property
    def _global_batch(self) -> int:
        """Windows per optimizer step over all ranks: batch x accumulation x ranks."""
        t = self.exp.training
        return t.batch_size * t.grad_accum_steps * self.world.world_size

    # -- training ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to ``training.max_steps``; return the summary logged in ``run_end``.

        SIGINT and SIGTERM end the current step, save a checkpoint and raise
        :class:`RunInterrupted`; a failure raises :class:`RunError` after logging
        ``run_failed``. Checkpoints already written are never touched by either.
        """
        try:
            run = self._run = self._open_run()
            if self._payload is not None:
                self._restore(self._payload)
            previous = self._catch_signals()
            try:
                return self._train(run)
            except HookFailure as exc:
                message = f"{exc} at step {self._current_step}; {self._kept(run)}"
                run.log("run_failed", step=self._current_step, error=message)
                raise RunError(self.world.label + message) from exc
            except RunError as exc:
                run.log("run_failed", step=self._current_step, error=str(exc))
                if self.world.launched:
                    raise RunError(self.world.label + str(exc)) from exc
                raise
            except RuntimeError as exc:
                if not (self.world.launched and is_lost_peer(exc)):
                    raise
                # Another rank died or hung: torchrun's own report names it.
                message = (
                    f"{self.world.label}lost contact with the other ranks at step "
                    f"{self._current_step} ({first_line(exc)}): a rank died or stopped "
                    f"responding (torchrun's report names it); {self._kept(run)}"
                )
                run.log("run_failed", step=self._current_step, error=message)
                raise RunError(message) from None
            finally:
                self.console.close()
                run.logger.close()
                # Before the handlers go back: torchrun may still forward a signal.
                self.world.leave()
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        finally:
            self.world.leave()  # when the run folder could not be opened

    def _catch_signals(self) -> dict[int, Any]:
        """Turn SIGINT/SIGTERM into a request to stop after the current step."""
        self._stop_signal: int | None = None
        launched = self.world.launched
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum: int, _frame: Any) -> None:
            # A second Ctrl-C stops at once; not under torchrun, where a Ctrl-C reaches
            # each rank twice (from the terminal, then forwarded by torchrun).
            if self._stop_signal is not None and signum == signal.SIGINT and not launched:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
        return previous

    @staticmethod
    def _kept(run: Run) -> str:
        latest = run.run_dir / "checkpoints" / checkpoint.LATEST
        if latest.exists():
            return f"the last checkpoint, {latest}, is intact"
        return "no checkpoint had been written yet"

    def _stop(self, run: Run, saved: bool) -> None:
        """Save (unless this step just did) and raise :class:`RunInterrupted`."""
        assert self._stop_signal is not None
        name = signal.Signals(self._stop_signal).name
        path = run.run_dir / "checkpoints" / f"step_{self.step}.pt"
        if not saved:
            path = self.save_checkpoint(run)
        run.log("run_interrupted", step=self.step, signal=name, checkpoint=str(path))
        code = 128 + self._stop_signal
        if not self.world.is_main:
            raise RunInterrupted(
                f"{name} at step {self.step} on rank {self.world.rank}; rank 0 saved the "
                "checkpoint",
                exit_code=code,
            )
        command = f"slmkit run {self.source} --resume {run.run_dir}"
        if self.world.launched:
            command = f"torchrun <the same options> -m {command}"
        raise RunInterrupted(
            f"{name} at step {self.step}: saved {path}; resume with: {command}", exit_code=code
        )

    def _agreed_stop(self) -> int | None:
        """The stop request every rank acts on: a signal any rank received (one read)."""
        if not self.world.launched:
            return self._stop_signal
        return self.world.max_int(self._stop_signal or 0) or None

    def _finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss and every gradient are finite (one device read), on every rank."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
        return self.world.all_true(bool(torch.isfinite(loss.detach()) & torch.isfinite(total)))

    def _train(self, run: Run) -> dict[str, Any]:
        exp, t = self.exp, self.exp.training
        run.log("run_start", **self._run_start_fields())
        resumed = self._payload is not None
        self.console.say(
            f"{'resuming' if resumed else 'run'} {run.run_id}: {self.model.n_params:,} parameters"
            f" on {self.device}, {len(self.splits.train):,} training tokens -> {run.run_dir}"
        )
        if self.world.launched:
            self.console.say(
                f"{self.world.world_size} ranks ({self.world.backend}): global batch "
                f"{t.batch_size} per rank x {t.grad_accum_steps} micro-batches x "
                f"{self.world.world_size} ranks = {self._global_batch} windows per step"
            )
        for entry in self._all_hooks():
            entry.start(run)
        self._event["on_run_start"](run=run)
        tokens_per_step = self._global_batch * exp.model.context_length  # all ranks together
        started = time.perf_counter()
        start_step = self.step
        window_start, window_steps = time.perf_counter(), 0
        last_loss = float("nan")
        tokens_per_s = 0.0
        self.model.train()
        while self.step < t.max_steps:
            step = self._current_step = self.step + 1
            last_step = step == t.max_steps
            log_now = step % t.log_every == 0 or last_step
            lr = self._set_lr(self.step)
            loss = self._train_step(run, step, log_now)
            self.step = step
            window_steps += 1
            metrics: dict[str, Any] = {"lr": lr}
            first = self.step == start_step + 1  # show progress at once, not after log_every
            if log_now or first:
                last_loss = self.world.mean(loss).item()  # read back only when logging
                now = time.perf_counter()
                tokens_per_s = window_steps * tokens_per_step / max(now - window_start, 1e-9)
                window_start, window_steps = now, 0
                if log_now:
                    metrics.update(train_loss=last_loss, tokens_per_s=tokens_per_s)
                    run.log(
                        "train_step",
                        step=self.step,
                        train_loss=last_loss,
                        lr=lr,
                        tokens_per_s=round(tokens_per_s, 1),
                    )
                per_step = (now - started) / (self.step - start_step)
                self.console.progress(
                    self.step,
                    t.max_steps,
                    last_loss,
                    tokens_per_s,
                    per_step * (t.max_steps - self.step),
                    self.last_val_loss,
                )
            self._event["on_step_end"](run=run, step=self.step, metrics=metrics)
            if (t.eval_every and self.step % t.eval_every == 0) or last_step:
                self._evaluate(run)
            sample_now = (exp.sampling.every and self.step % exp.sampling.every == 0) or last_step
            if sample_now and self.world.is_main:
                self._sample(run)
            saved = (t.checkpoint_every and self.step % t.checkpoint_every == 0) or last_step
            if saved:
                self.save_checkpoint(run)
            self._stop_signal = self._agreed_stop()  # every rank stops at the same step
            if self._stop_signal is not None and not last_step:
                self._stop(run, bool(saved))
        elapsed = time.perf_counter() - started
        trained = (self.step - start_step) * tokens_per_step
        summary = {
            "steps": self.step,
            "train_loss": last_loss,
            "val_loss": self.last_val_loss,
            "best_val_loss": self.best_val_loss,
            "skipped_steps": self.skipped_steps,
            "val_bpc": None
            if self.last_val_loss is None
            else bits_per_char(self.last_val_loss, self.splits.chars_per_token),
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(trained / elapsed, 1) if elapsed > 0 else None,
            "run_dir": str(run.run_dir),
        }
        run.log("run_end", summary=summary)
        self._event["on_run_end"](run=run, summary=summary)
        self.console.say(
            f"finished {run.run_id} at step {self.step}: val_loss {self.last_val_loss:.4f}; "
            f"outputs in {run.run_dir}"
        )
        return summary

    def _train_step(self, run: Run, step: int, log_now: bool) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches; the mean loss."""
        t = self.exp.training
        total = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum_steps):
            x, y = self.stream.next_batch()
            if self.device.type == "cuda":  # page-locked, so the copies below run async
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            hooks = self.forward_hooks if micro == 0 else None  # watch the first micro-batch
            with self._grad_sync(micro == t.grad_accum_steps - 1):
                watching = hooks.begin("train", step) if hooks else None
                try:
                    with self._autocast():
                        _, loss = self._forward(x, y)
                except BaseException:
                    if self.forward_hooks is not None:
                        self.forward_hooks.detach()  # leave the model clean for its holder
                    raise
                if watching:
                    self._log_forward_hooks(run, step, "train", watching)
                assert loss is not None
                loss = loss / t.grad_accum_steps  # gradients add up to those of the mean loss
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # update hooks see the true gradients
        if self.update_hooks is not None:
            for entry, hook_metrics in self.update_hooks.apply(step, log_now):
                run.log("update_hook", step=step, name=entry.name, metrics=hook_metrics)
        if self.scaler is not None:  # fp16: the scaler skips steps with inf/NaN itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self._finite(total):
            self.optimizer.step()
        elif t.on_nonfinite == "skip":
            self.skipped_steps += 1
            run.log("nonfinite_skipped", step=step, skipped_steps=self.skipped_steps)
            self.console.say(f"step {step}: non-finite loss or gradient; update skipped")
        else:
            raise RunError(
                f"non-finite loss or gradient at step {step}: stopped ({self._kept(run)}); "
                'training.on_nonfinite = "skip" would skip such steps instead'
            )
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _grad_sync(self, last_micro_batch: bool) -> Any:
        """DDP all-reduces gradients on the last micro-batch of a step only (``no_sync``)."""
        if self.ddp is None or last_micro_batch:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _autocast(self) -> Any:
        """Mixed precision for the forward pass (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _forward(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model (DDP-wrapped under torchrun), compiled if asked; falls back if needed."""
        if self.compiled is None:
            return self._train_module(x, y)
        if self._compile_ok:
            return self.compiled(x, y)
        try:
            out = self.compiled(x, y)
        except HookFailure:
            raise
        except Exception as exc:  # no C++ compiler, unsupported platform...
            self.compiled = None
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            self.console.say(f"warning: torch.compile failed, training uncompiled: {first_line}")
            if self._run is not None:
                self._run.log("compile_failed", error=first_line)
            return self._train_module(x, y)
        self._compile_ok = True
        return out

    def _set_lr(self, step: int) -> float:
        factor = self.schedule(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        return self.base_lrs[0] * factor

    def _log_forward_hooks(
        self, run: Run, step: int, phase: str, active: list[EnabledHook]
    ) -> None:
        assert self.forward_hooks is not None
        for entry, metrics in self.forward_hooks.end(phase, step, active):
            run.log("forward_hook", step=step, name=entry.name, phase=phase, metrics=metrics)

    def _evaluate(self, run: Run) -> None:
        watching = self.forward_hooks.begin("eval", self.step) if self.forward_hooks else None
        try:
            with self._autocast():
                val_loss = self._validation_loss()
        except BaseException:
            if self.forward_hooks is not None:
                self.forward_hooks.detach()
            raise
        if watching:
            self._log_forward_hooks(run, self.step, "eval", watching)
        val_bpc = bits_per_char(val_loss, self.splits.chars_per_token)
        self.last_val_loss = val_loss
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
        run.log("eval", step=self.step, val_loss=val_loss, val_bpc=val_bpc)
        self.console.say(f"step {self.step}: val_loss {val_loss:.4f} ({val_bpc:.3f} bits/char)")
        self._event["on_eval"](
            run=run, step=self.step, metrics={"val_loss": val_loss, "val_bpc": val_bpc}
        )

    def _validation_loss(self) -> float:
        """The mean validation loss; under torchrun each rank evaluates its share."""
        if not self.world.launched:
            return evaluate(self.model, self.val_batches, self.device)
        total, count = loss_sum(self.model, self.val_share, self.device)
        sums = self.world.sum(torch.stack([total, total.new_tensor(float(count))]))
        return float(sums[0] / sums[1])

    def _sample(self, run: Run) -> None:
        s = self.exp.sampling
        text = sample_text(
            self.model,
            self.tokenizer,
            s.prompt,
            s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=self.exp.experiment.seed + self.step,
            device=self.device,
        )
        run.log("sample", step=self.step, prompt=s.prompt, sample_text=text)
        preview = text.strip().replace("\n", " / ")[:100]
        self.console.say(f"step {self.step}: sample: {preview}")

    def checkpoint_payload(
        self, run_id: str, rng_per_rank: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Everything a bit-exact resume needs, as tensors and plain values.

        A run under torchrun adds ``world_size`` and ``rng_per_rank`` (every rank's RNG
        states, gathered to rank 0); its model weights are the unwrapped model's.
        """
        payload = {
            "format": checkpoint.FORMAT_VERSION,
            "slmkit_version": __version__,
            "run_id": run_id,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else {},
            "data": self.stream.state_dict(),
            "update_hooks": self.update_hooks.state_dict() if self.update_hooks else [],
            "grad_scaler": self.scaler.state_dict() if self.scaler else {},
            "rng": checkpoint.rng_state(),
            "experiment": self.exp.to_dict(),
            "tokenizer": tokenizer_record(self.exp, self.tokenizer),
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
            "skipped_steps": self.skipped_steps,
            "environment": environment(self.device),
        }
        if self.world.launched:
            payload["world_size"] = self.world.world_size
            payload["rng_per_rank"] = rng_per_rank
        return payload

    def save_checkpoint(self, run: Run) -> Path:
        """Write ``step_<N>.pt`` atomically, point ``latest.pt`` at it, prune old ones.

        Under torchrun every rank calls it (their RNG states are gathered) and rank 0 writes.
        """
        folder = run.run_dir / "checkpoints"
        path = folder / f"step_{self.step}.pt"
        rngs = self.world.gather(checkpoint.rng_state()) if self.world.launched else None

        def write() -> None:
            try:
                checkpoint.atomic_save(self.checkpoint_payload(run.run_id, rngs), path)
                checkpoint.point_latest(path)
            except OSError as exc:  # disk full, permissions...: the previous files are intact
                raise RunError(
                    f"could not write checkpoint {path}: {exc}; {self._kept(run)}"
                ) from exc
            checkpoint.prune(folder, self.exp.training.keep_checkpoints)

        self.world.from_main(write)
        run.log("checkpoint", step=self.step, path=str(path.relative_to(run.run_dir)))
        self._event["on_checkpoint"](run=run, step=self.step, path=path)
        return path


def _ignore(**_kwargs: Any) -> None:
    """A run-event caller that calls nobody (ranks other than 0)."""


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
