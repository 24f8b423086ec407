"""Probes: measurements of the model on inputs of their own, at evaluations.

A probe (a plugin component, enabled by a ``[[probes]]`` table) makes its fixed batch once,
while the run is built, with a generator seeded by its table. At every ``every``-th
evaluation, and at the last, :class:`Probes` puts the model in eval mode without
gradients, lets each due probe run it on its batch with the hook points it reads watched,
and logs the metrics as a ``probe`` event. Probing leaves the run as it found it: every
RNG state is put back and the model's mode restored, and a probe that changes a parameter
or buffer fails naming it, so a run with probes trains bit for bit as one without. A run
without probes builds none of this: the evaluation skips it with one check.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import torch

from slmkit import checkpoint
from slmkit.components import ProbeContext, ProbeSetup, Tokenizer
from slmkit.config.schema import Experiment, ProbeSection
from slmkit.errors import ConfigError, HookFailure
from slmkit.hookpoint import HookPoint, Observer
from slmkit.hooks import EnabledHook, select_points
from slmkit.model import LanguageModel
from slmkit.options import OptionValueError
from slmkit.run import Run


class ParameterModified(Exception):
    """A probe changed a parameter or buffer of the model."""

    def __init__(self, names: list[str]) -> None:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        super().__init__(
            f"it changed the model's {names[0]!r}{more} in place; a probe must only read "
            "the model (work on a copy)"
        )


class MetricsRefused(Exception):
    """A probe returned metrics that are not numbers, per-layer or per-head lists."""


@attrs.define
class EnabledProbe:
    """One probe of a run: the hook entry naming it, its points, its fixed batch."""

    entry: EnabledHook
    #: the hook points its globs select, in the model's order
    points: list[str]
    #: its fixed batch of token ids, on the model's device
    tokens: torch.Tensor


class Probes:
    """The enabled probes of a run, measured at evaluations (rank 0 only)."""

    def __init__(
        self,
        probes: list[EnabledProbe],
        model: LanguageModel,
        tokenizer: Tokenizer,
        eval_every: int,
        max_steps: int,
    ) -> None:
        self.probes, self.model, self.tokenizer = probes, model, tokenizer
        self.eval_every, self.max_steps = eval_every, max_steps

    @property
    def hooks(self) -> list[EnabledHook]:
        """The probes as hook entries (for ``start(run)`` and the run's ``hook_list``)."""
        return [p.entry for p in self.probes]

    def due(self, probe: EnabledProbe, step: int) -> bool:
        """At every ``every``-th evaluation (counted from the run's start) and the last.

        Evaluation k falls at step ``k * eval_every``, so the count needs no state and a
        resumed run probes at the steps the uninterrupted one does.
        """
        every = probe.entry.every * self.eval_every
        return step == self.max_steps or (every > 0 and step % every == 0)

    def measure(self, run: Run, step: int) -> None:
        """Run every probe due at ``step``; log each one's metrics as a ``probe`` event."""
        due = [p for p in self.probes if self.due(p, step)]
        if not due:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), rng_kept():
                for probe in due:
                    metrics = self._measure(probe, step)
                    run.log("probe", step=step, probe=probe.entry.name,
                            plugin=probe.entry.plugin, metrics=metrics)  # fmt: skip
        finally:
            self.model.train(was_training)

    def _measure(self, probe: EnabledProbe, step: int) -> dict[str, Any]:
        """One probe's metrics, checked; a parameter it changed fails naming it.

        Gradients it computed are dropped: the training step after the evaluation must
        start from the gradients it would have had.
        """
        entry, model = probe.entry, self.model
        tensors = [*model.named_parameters(), *model.named_buffers()]
        versions = [t._version for _, t in tensors]
        context = ProbeContext(
            model=model, tokenizer=self.tokenizer, dims=model.dims, step=step,
            tokens=probe.tokens,
            forward=functools.partial(forward_watching, model, probe.points),
            readout=model.readout, loss=model.loss,
        )  # fmt: skip
        grads = [p.grad for p in model.parameters()]
        metrics = entry.call("measure", context)
        for p, grad in zip(model.parameters(), grads, strict=True):
            p.grad = grad  # gradients a probe computed (attribution, say) are dropped
        changed = [n for (n, t), v in zip(tensors, versions, strict=True) if t._version != v]
        if changed:
            raise HookFailure(f"{entry.label}.measure", entry.plugin, ParameterModified(changed))
        try:
            return plain_metrics(metrics)
        except MetricsRefused as exc:
            raise HookFailure(f"{entry.label}.measure", entry.plugin, exc) from None


def forward_watching(
    model: LanguageModel, points: list[str], tokens: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits of ``tokens`` and the activations at ``points``, in the model's order."""
    seen: dict[str, torch.Tensor] = {}

    def keep(point: str, activation: torch.Tensor) -> None:
        seen[point] = activation

    watched = [model.hook_points[name] for name in points]
    with _observing(watched, keep):
        logits, _ = model(tokens)
    return logits, {name: seen[name] for name in model.hook_points if name in seen}


@contextlib.contextmanager
def _observing(points: list[HookPoint], observer: Observer) -> Iterator[None]:
    """``observer`` on ``points`` for the ``with`` block; removed also when it raises."""
    for point in points:
        point.observers.append(observer)
    try:
        yield
    finally:
        for point in points:
            point.observers.remove(observer)


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Put every RNG state a run draws from (torch, CUDA, Python, NumPy) back afterwards."""
    state = checkpoint.rng_state()
    try:
        yield
    finally:
        checkpoint.set_rng_state(state)


def plain_metrics(metrics: Any) -> dict[str, Any]:
    """A probe's metrics as JSON values: each a float, a list of floats, or of such lists.

    Tensors keep their shape (a one-element list stays a list): ``tolist()``, one device
    read per tensor.
    """
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        raise MetricsRefused(f"it returned {type(metrics).__name__}, not a dict of metrics by name")
    return {name: _plain_value(name, value) for name, value in metrics.items()}


def _plain_value(name: str, value: Any, depth: int = 0) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().tolist()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list | tuple) and depth < 2:
        return [_plain_value(name, v, depth + 1) for v in value]
    what = "nested too deep" if isinstance(value, list | tuple) else f"a {type(value).__name__}"
    raise MetricsRefused(
        f"its metric {name!r} is {what}, not a number, a list of numbers or a list of such lists"
    )


# -- building ------------------------------------------------------------------------------


def build_probes(
    exp: Experiment,
    enabled: Iterable[tuple[int, ProbeSection, EnabledHook]],
    model: LanguageModel,
    tokenizer: Tokenizer,
    val_tokens: torch.Tensor,
) -> Probes | None:
    """The enabled ``[[probes]]``: their points checked, their fixed batches made.

    A glob matching no hook point of the model (a block without ``attn.hook_pattern``,
    say), an option its ``inputs`` refuses or a batch that does not fit the model is a
    :class:`ConfigError` naming ``probes.<i>``; nothing here draws from torch's RNG.
    """
    probes = []
    names = list(model.hook_points)
    for i, section, entry in enabled:
        where = f"probes.{i}"
        points: list[str] = []
        for pattern, matched in select_points(
            names, list(getattr(entry.hook, "points", ()))
        ).items():
            if not matched:
                raise ConfigError(
                    exp.source, f"{where}.name",
                    f"probe {entry.name!r} (plugin {entry.plugin!r}) reads the hook point "
                    f"{pattern!r}, which this model does not have (its blocks are "
                    f"{exp.model.block!r}; docs/hooks.md lists the points)",
                )  # fmt: skip
            points += [m for m in matched if m not in points]
        tokens = _fixed_batch(exp, where, section, entry, model, tokenizer, val_tokens)
        probes.append(EnabledProbe(entry, [n for n in names if n in points], tokens))
    if not probes:
        return None
    t = exp.training
    return Probes(probes, model, tokenizer, t.eval_every, t.max_steps)


def _fixed_batch(
    exp: Experiment,
    where: str,
    section: ProbeSection,
    entry: EnabledHook,
    model: LanguageModel,
    tokenizer: Tokenizer,
    val_tokens: torch.Tensor,
) -> torch.Tensor:
    """The probe's batch from ``inputs``, drawn with its own generator, checked."""
    generator = torch.Generator().manual_seed(section.seed)
    setup = ProbeSetup(model.dims, tokenizer, generator, val_tokens)
    try:
        with rng_kept():  # a probe drawing from the global RNG would shift the run
            tokens = entry.call("inputs", setup)
    except HookFailure as failure:
        cause = failure.cause
        if isinstance(cause, OptionValueError):
            raise ConfigError(exp.source, f"{where}.{cause.key}", cause.message) from None
        raise ConfigError(exp.source, where, str(failure)) from cause
    dims = model.dims
    if not _fits(tokens, dims.context_length + 1, dims.vocab_size):
        got = (
            f"{tokens.dtype} of shape {list(tokens.shape)}"
            if isinstance(tokens, torch.Tensor)
            else type(tokens).__name__
        )
        raise ConfigError(
            exp.source, where,
            f"probe {entry.name!r} (plugin {entry.plugin!r}) made its batch as {got}; it "
            f"must be token ids below {dims.vocab_size} of shape (batch, time), time from 1 "
            f"to context_length + 1 = {dims.context_length + 1}",
        )  # fmt: skip
    return tokens.long().to(next(iter(model.parameters())).device)


def _fits(tokens: Any, max_time: int, vocab_size: int) -> bool:
    """Whether ``tokens`` is a non-empty batch of token ids a model with these sizes reads."""
    return (
        isinstance(tokens, torch.Tensor)
        and tokens.dim() == 2
        and not tokens.dtype.is_floating_point
        and tokens.dtype != torch.bool
        and 0 < tokens.shape[1] <= max_time
        and len(tokens) > 0
        and 0 <= int(tokens.min()) <= int(tokens.max()) < vocab_size
    )
