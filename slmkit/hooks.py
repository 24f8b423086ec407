"""Forward hooks and update hooks: how the kernel attaches and calls them.

A forward hook observes the activations flowing through the hook points
(:mod:`slmkit.hookpoint`) it selects by glob, on the passes it asks for. Update hooks
transform ``p.grad`` in place after backward and before the optimizer step, in the order
the experiment lists them. Either may fail: the exception becomes a :class:`HookFailure`
naming the plugin and the hook.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from slmkit.errors import HookFailure
from slmkit.hookpoint import HookPoint, Observer
from slmkit.run import Run


def select_points(points: Sequence[str], patterns: Sequence[str]) -> dict[str, list[str]]:
    """``{pattern: [matching points]}``; ``*`` matches across dots (``blocks.*.hook_q``)."""
    return {p: [name for name in points if fnmatch.fnmatchcase(name, p)] for p in patterns}


def to_plain(value: Any) -> Any:
    """Metrics as JSON values: tensors become floats or lists (one device sync each)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


class ActivationModified(Exception):
    """A forward hook changed the activation it observed, in place."""

    def __init__(self, point: str) -> None:
        super().__init__(
            f"it modified the activation at {point!r} in place, which would change what the "
            "model computes; observers must only read (work on activation.clone())"
        )


class EnabledHook:
    """One hook component enabled by an experiment table."""

    def __init__(self, kind: str, name: str, plugin: str, hook: Any, every: int = 1) -> None:
        self.kind, self.name, self.plugin, self.hook, self.every = kind, name, plugin, hook, every
        self.points: list[str] = []

    @property
    def label(self) -> str:
        """``update hook 'clip_grad_norm'``."""
        return f"{self.kind.replace('_', ' ')} {self.name!r}"

    def call(self, method: str, *args: Any) -> Any:
        """Call ``hook.method(*args)``; an exception becomes a :class:`HookFailure`."""
        try:
            return getattr(self.hook, method)(*args)
        except HookFailure:
            raise
        except (Exception, SystemExit) as exc:  # sys.exit() in a plugin fails the run, logged
            raise HookFailure(f"{self.label}.{method}", self.plugin, exc) from exc

    def start(self, run: Run) -> None:
        """Call the hook's optional ``start(run)``."""
        if hasattr(self.hook, "start"):
            self.call("start", run)


class ForwardHooks:
    """The enabled forward hooks of a run, attached to their points pass by pass."""

    def __init__(self, hooks: list[EnabledHook], points: dict[str, HookPoint]) -> None:
        self.hooks, self.points = hooks, points

    @contextlib.contextmanager
    def watching(self, run: Run, phase: str, step: int) -> Iterator[None]:
        """Observe the pass run inside the ``with`` block, then log each hook's metrics.

        The observers are removed when the block ends, also when it raises, so the model
        is left clean for whoever holds it; metrics are flushed and logged (as
        ``forward_hook`` events) only after a pass that completed.
        """
        active = self.begin(phase, step)
        try:
            yield
        finally:
            self.detach()
        for entry, metrics in self.end(phase, step, active):
            run.log("forward_hook", step=step, name=entry.name, phase=phase, metrics=metrics)

    def begin(self, phase: str, step: int) -> list[EnabledHook]:
        """Attach the hooks that observe this pass; return them."""
        active = [h for h in self.hooks if phase in h.hook.phases and step % h.every == 0]
        for entry in active:
            observer = self._observer(entry)
            for name in entry.points:
                self.points[name].observers.append(observer)
        return active

    @staticmethod
    def _observer(entry: EnabledHook) -> Observer:
        def observe(point: str, activation: torch.Tensor) -> None:
            if activation.is_inference():  # no version counter to check: a private copy
                with torch.no_grad():
                    entry.call("observe", point, activation.clone())
                return
            version = activation._version  # shared with the model's tensor and its views
            with torch.no_grad():
                entry.call("observe", point, activation)
            if activation._version != version:
                raise HookFailure(f"{entry.label}.observe", entry.plugin, ActivationModified(point))

        return observe

    def detach(self) -> None:
        """Remove every observer from every point."""
        for point in self.points.values():
            point.observers.clear()

    def end(
        self, phase: str, step: int, active: list[EnabledHook]
    ) -> list[tuple[EnabledHook, Any]]:
        """Detach everything; ``(hook, metrics)`` from each active hook's ``flush``."""
        self.detach()
        results = []
        for entry in active:
            metrics = entry.call("flush", step, phase)
            if metrics is not None:
                results.append((entry, to_plain(metrics)))
        return results


class UpdateHooks:
    """The enabled update hooks of a run, applied in order to the gradients."""

    def __init__(
        self, hooks: list[EnabledHook], parameters: list[tuple[str, nn.Parameter]]
    ) -> None:
        self.hooks, self.parameters = hooks, parameters

    def apply(self, step: int, log: bool) -> list[tuple[EnabledHook, Any]]:
        """Run every hook on the gradients; ``(hook, metrics)`` for the log when ``log``."""
        results = []
        for entry in self.hooks:
            metrics = entry.call("apply", self.parameters, step, log)
            if log and metrics is not None:
                results.append((entry, to_plain(metrics)))
        return results

    def state_dict(self) -> list[dict[str, Any]]:
        """Each hook's state (empty for stateless hooks), in order."""
        return [h.call("state_dict") if hasattr(h.hook, "state_dict") else {} for h in self.hooks]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for entry, state in zip(self.hooks, states, strict=True):
            if hasattr(entry.hook, "load_state_dict"):
                entry.call("load_state_dict", state)
