"""One optimizer step: micro-batches, precision, gradient sync, hooks, the update.

    for each micro-batch:  forward (autocast; forward hooks watch the first) -> backward
    then:                  update hooks -> finite? -> optimizer.step() -> zero_grad

A step whose loss or gradients are not finite is never applied. Under ``on_nonfinite =
"skip"`` an applied update that leaves a weight non-finite is undone (:class:`UpdateUndo`).

A :class:`~slmkit.precision.Precision` decides the autocast dtype and, for fp16, the
gradient scaler. :class:`Stepper` owns the training-mode model: wrapped in DDP under
torchrun (gradients are all-reduced on the last micro-batch only) and, under
``training.compile``, compiled as one graph (``fullgraph``: forward, loss and, through
AOTAutograd, backward). A pass that forward hooks watch runs eager (the same computation
and random draws; observers are Python the compiler would have to trace, and each watched
set of points would compile again). Where compiling fails (no C++ compiler, a graph break
in a block plugin, an operator inductor cannot lower) the run says so once, logs
``compile_failed`` and trains eager from then on.
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from slmkit.checkpoint import kept_note
from slmkit.components import Schedule
from slmkit.config.schema import Experiment
from slmkit.data import BatchStream
from slmkit.distributed import World
from slmkit.errors import HookFailure, RunError
from slmkit.hooks import ForwardHooks, UpdateHooks
from slmkit.model import LanguageModel
from slmkit.precision import Precision
from slmkit.progress import Console
from slmkit.run import Run


class UpdateUndo:
    """The weights and the optimizer's state from before an update, to put back after it.

    Kept under ``on_nonfinite = "skip"`` only: a copy of every parameter and of the
    optimizer's per-parameter state (AdamW: its two moments and step count) and of its
    groups' settings, taken before each update. The grad scaler (fp16) keeps its new scale.
    """

    def __init__(self, model: LanguageModel, optimizer: torch.optim.Optimizer) -> None:
        self.parameters = list(model.parameters())
        self.optimizer = optimizer
        self.weights: list[torch.Tensor] = []
        self.state: dict[Any, dict[str, Any]] = {}
        self.groups: list[dict[str, Any]] = []

    def save(self) -> None:
        """Copy the weights and the optimizer's state (into the same buffers each step)."""
        with torch.no_grad():
            if not self.weights:
                self.weights = [p.detach().clone() for p in self.parameters]
            else:
                torch._foreach_copy_(self.weights, [p.detach() for p in self.parameters])
        self.state = {
            p: {k: _copy(v) for k, v in s.items()} for p, s in self.optimizer.state.items()
        }
        self.groups = [{k: _copy(v) for k, v in g.items() if k != "params"}
                       for g in self.optimizer.param_groups]  # fmt: skip

    def restore(self) -> None:
        """Put back what :meth:`save` copied: the update never happened."""
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self.parameters], self.weights)
        self.optimizer.state.clear()  # state the update created (AdamW's first step) goes
        self.optimizer.state.update(self.state)
        for group, saved in zip(self.optimizer.param_groups, self.groups, strict=True):
            group.update(saved)
        self.state = {}


def _copy(value: Any) -> Any:
    """A tensor cloned, anything else deep-copied: optimizer state and settings."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


class Stepper:
    """Takes optimizer steps: set the learning rate, then :meth:`step`."""

    def __init__(
        self,
        exp: Experiment,
        model: LanguageModel,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        stream: BatchStream,
        precision: Precision,
        world: World,
        console: Console,
        forward_hooks: ForwardHooks | None = None,
        update_hooks: UpdateHooks | None = None,
    ) -> None:
        self.model, self.optimizer, self.schedule, self.stream = model, optimizer, schedule, stream
        self.precision, self.world, self.console = precision, world, console
        self.forward_hooks, self.update_hooks = forward_hooks, update_hooks
        self.accum_steps = exp.training.grad_accum_steps
        self.on_nonfinite = exp.training.on_nonfinite
        self.device = precision.device
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.skipped_steps = 0
        self.undo = UpdateUndo(model, optimizer) if self.on_nonfinite == "skip" else None
        # DDP wraps the model for training passes only; evaluation, sampling, hooks and
        # checkpoints use the model itself (so state dicts have no "module." prefix).
        self.ddp: DistributedDataParallel | None = None
        if world.launched:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids)
        self.train_module: torch.nn.Module = self.ddp if self.ddp is not None else model
        self.compiled: Any = (
            torch.compile(self.train_module, fullgraph=True) if exp.training.compile else None
        )

    def set_lr(self, step: int) -> float:
        """Apply the schedule's multiplier for ``step`` (from 0); the first group's lr."""
        factor = self.schedule(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        return self.base_lrs[0] * factor

    def step(self, run: Run, step: int, log_now: bool) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches; the mean loss."""
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum_steps):
            x, y = self._next_batch()
            hooks = self.forward_hooks if micro == 0 else None  # watch the first micro-batch
            watch = hooks.watching(run, "train", step) if hooks else contextlib.nullcontext()
            with self._grad_sync(micro == self.accum_steps - 1):
                with watch, self.precision.autocast():
                    _, loss = self._forward(run, x, y)
                assert loss is not None
                loss = loss / self.accum_steps  # gradients add up to those of the mean loss
                scaler = self.precision.scaler
                (scaler.scale(loss) if scaler else loss).backward()
            total += loss.detach()
        self._update(run, step, total, log_now)
        return total

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.stream.next_batch()
        if self.device.type == "cuda":  # page-locked, so the copies below run async
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _update(self, run: Run, step: int, loss: torch.Tensor, log_now: bool) -> None:
        """Update hooks, then the optimizer step, unless the step is not finite."""
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # update hooks see the true gradients
        if self.update_hooks is not None:
            for entry, metrics in self.update_hooks.apply(step, log_now):
                run.log("update_hook", step=step, name=entry.name, metrics=metrics)
        # fp16: the scaler skips steps with inf/NaN gradients itself
        if scaler is None and not self._finite(loss):
            self._nonfinite(run, step, "loss or gradient")
        else:
            if self.undo is not None:
                self.undo.save()
            if scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
            if self.undo is not None and not self._weights_finite():
                self.undo.restore()
                self._nonfinite(run, step, "weights after the update")
        self.optimizer.zero_grad(set_to_none=True)

    def _nonfinite(self, run: Run, step: int, what: str) -> None:
        """Count and log a skipped update; or, under ``on_nonfinite = "stop"``, stop."""
        if self.on_nonfinite == "skip":
            self.skipped_steps += 1
            run.log("nonfinite_skipped", step=step, skipped_steps=self.skipped_steps, cause=what)
            self.console.say(f"step {step}: non-finite {what}; update skipped")
            return
        raise RunError(
            f"non-finite {what} at step {step}: stopped ({kept_note(run.run_dir)}); "
            'training.on_nonfinite = "skip" would skip such steps instead'
        )

    def _finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss and every gradient are finite (one device read), on every rank."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
        return self.world.all_true(bool(torch.isfinite(loss.detach()) & torch.isfinite(total)))

    def _weights_finite(self) -> bool:
        """Whether every weight is finite (one device read), on every rank."""
        # Their total norm, like the gradients': NaN and inf propagate (and weights past
        # 1e19, which overflow it, are as broken). The inf-norm would be exact but is 20x
        # slower on a CPU.
        total = torch.nn.utils.get_total_norm(list(self.model.parameters()))
        return self.world.all_true(bool(torch.isfinite(total)))

    def _grad_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP all-reduces gradients on the last micro-batch of a step only (``no_sync``)."""
        if self.ddp is None or last_micro_batch:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _forward(
        self, run: Run, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model (DDP-wrapped under torchrun), compiled if asked; falls back if needed."""
        if self.compiled is None or self._watched():
            return self.train_module(x, y)
        # A failure part-way through a compiled pass may have drawn dropout masks already:
        # the eager pass that replaces it draws them again from the same state.
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        try:
            return self.compiled(x, y)
        except HookFailure:
            raise
        except Exception as exc:  # no C++ compiler, a graph break, an op inductor cannot lower
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)
            self.compiled = None
            error = compile_error(exc)
            self.console.say(f"warning: torch.compile failed, training uncompiled: {error}")
            run.log("compile_failed", error=error)
            return self.train_module(x, y)

    def _watched(self) -> bool:
        """Whether a forward hook watches this pass (it then runs eager)."""
        return any(point.observers for point in self.model.hook_points.values())


def compile_error(exc: BaseException) -> str:
    """A compile failure on one line: for one in tracing, where in the model, and why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    why = next((ln.removeprefix("Explanation: ") for ln in lines if ln.startswith("Explanation: ")),
               lines[0] if lines else type(exc).__name__)  # fmt: skip
    why = re.sub(r"^\[[^\]]*\]\s*", "", why)[:200]  # no "[file.cc:42]" source prefix
    stack = getattr(exc, "real_stack", None)  # torch._dynamo's errors: the model's frames
    if not stack:
        return why
    frame = stack[-1]
    return f"the model is not one graph at {Path(frame.filename).name}:{frame.lineno}: {why}"
