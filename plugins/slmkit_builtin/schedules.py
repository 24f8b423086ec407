"""Warmup-and-decay learning-rate schedules: ``cosine``, ``linear`` and ``wsd``.

Each schedule is a multiplier of the base learning rate (``optimizer.learning_rate``) at
optimizer step ``step``, counted from 0, for a run of ``max_steps`` steps (steps
``0 .. max_steps - 1``). All three share the same conventions:

* linear warmup over ``warmup_steps``: multiplier ``(step + 1) / warmup_steps`` for
  ``step < warmup_steps``, so the first step is not zero and step ``warmup_steps - 1``
  runs at the full rate (``warmup_steps = 0``: no warmup);
* the decay reaches ``min_lr_ratio`` at step ``max_steps``, one past the last step, and
  stays there (steps past ``max_steps`` are clamped): no optimizer step is spent at the
  final rate, which matters when it is 0. The minimum learning rate is
  ``learning_rate * min_lr_ratio``.

They are pure functions of the step and ``max_steps``, so they keep no state and resume
from a checkpoint exactly. A resumed run that changes ``training.max_steps`` continues on
the curve of the new length from its step onwards.
"""

from __future__ import annotations

import math

import attrs

import slmkit

#: decay shapes of ``wsd``: progress p in [0, 1] -> fraction of the way still to go
DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "sqrt": lambda p: 1.0 - math.sqrt(p),
}


@attrs.define(frozen=True)
class CosineOptions:
    """Options of ``cosine`` (keys of the ``[schedule]`` table)."""

    #: steps of linear warmup before the decay (must be < training.max_steps)
    warmup_steps: int = attrs.field(default=0, validator=slmkit.non_negative)
    #: final multiplier: the minimum learning rate is learning_rate * min_lr_ratio
    min_lr_ratio: float = attrs.field(default=0.1, validator=slmkit.in_range(0, 1))


@attrs.define(frozen=True)
class LinearOptions:
    """Options of ``linear`` (keys of the ``[schedule]`` table)."""

    #: steps of linear warmup before the decay (must be < training.max_steps)
    warmup_steps: int = attrs.field(default=0, validator=slmkit.non_negative)
    #: final multiplier: the minimum learning rate is learning_rate * min_lr_ratio
    min_lr_ratio: float = attrs.field(default=0.1, validator=slmkit.in_range(0, 1))


@attrs.define(frozen=True)
class WSDOptions:
    """Options of ``wsd`` (keys of the ``[schedule]`` table)."""

    #: steps of linear warmup (must end before the decay starts)
    warmup_steps: int = attrs.field(default=0, validator=slmkit.non_negative)
    #: the decay takes the last round(decay_fraction * max_steps) steps (at least 1)
    decay_fraction: float = attrs.field(default=0.1, validator=slmkit.in_range(0, 1, low_open=True))
    #: final multiplier: the minimum learning rate is learning_rate * min_lr_ratio
    min_lr_ratio: float = attrs.field(default=0.0, validator=slmkit.in_range(0, 1))
    #: shape of the decay: "sqrt" (1 - sqrt(progress)), "linear" or "cosine"
    decay: str = attrs.field(default="sqrt", validator=slmkit.one_of(tuple(DECAY_SHAPES)))


def _check_warmup(warmup_steps: int, max_steps: int) -> None:
    if warmup_steps >= max_steps:
        raise slmkit.OptionValueError(
            "warmup_steps", f"must be < training.max_steps={max_steps}, got {warmup_steps}"
        )


class _WarmupThenDecay:
    """Linear warmup, then ``r + (1 - r) * shape(p)`` with p going from 0 to 1 at max_steps."""

    def __init__(self, warmup_steps: int, min_lr_ratio: float, max_steps: int) -> None:
        _check_warmup(warmup_steps, max_steps)
        self.warmup_steps, self.min_lr_ratio, self.max_steps = (
            warmup_steps, min_lr_ratio, max_steps)  # fmt: skip

    @staticmethod
    def shape(p: float) -> float:
        """The decay from 1 (p = 0) to 0 (p = 1)."""
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        w, r = self.warmup_steps, self.min_lr_ratio
        if step < w:
            return (step + 1) / w
        p = min(1.0, (step - w) / (self.max_steps - w))
        return r + (1.0 - r) * self.shape(p)


class CosineSchedule(_WarmupThenDecay):
    """Linear warmup, then cosine decay from 1 to ``min_lr_ratio`` at ``max_steps``.

    With ``w = warmup_steps``, ``N = max_steps``, ``r = min_lr_ratio``::

        step < w:  (step + 1) / w
        step >= w: r + (1 - r) * 0.5 * (1 + cos(pi * p)),  p = min(1, (step - w) / (N - w))
    """

    @staticmethod
    def shape(p: float) -> float:
        """Half a cosine period."""
        return 0.5 * (1.0 + math.cos(math.pi * p))


class LinearSchedule(_WarmupThenDecay):
    """Linear warmup, then linear decay from 1 to ``min_lr_ratio`` at ``max_steps``.

    With ``w = warmup_steps``, ``N = max_steps``, ``r = min_lr_ratio``::

        step < w:  (step + 1) / w
        step >= w: r + (1 - r) * (1 - p),  p = min(1, (step - w) / (N - w))
    """

    @staticmethod
    def shape(p: float) -> float:
        """A straight line."""
        return 1.0 - p


class WSDSchedule:
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM): warmup, a constant 1, then a decay.

    The decay takes the last ``D = max(1, round(decay_fraction * N))`` steps and starts at
    ``S = N - D``; with ``w = warmup_steps`` (``w <= S``) and ``r = min_lr_ratio``::

        step < w:       (step + 1) / w
        w <= step < S:  1
        step >= S:      r + (1 - r) * f(p),  p = min(1, (step - S) / D)

    where ``f`` is the ``decay`` shape: ``sqrt``: ``1 - sqrt(p)`` (the default; the
    "1 - sqrt" cooldown of Hägele et al. 2024), ``linear``: ``1 - p``, ``cosine``:
    ``0.5 * (1 + cos(pi * p))``.
    """

    def __init__(
        self,
        warmup_steps: int,
        decay_fraction: float,
        min_lr_ratio: float,
        decay: str,
        max_steps: int,
    ) -> None:
        self.decay_steps = max(1, round(decay_fraction * max_steps))
        self.decay_start = max_steps - self.decay_steps
        if warmup_steps > self.decay_start:
            raise slmkit.OptionValueError(
                "warmup_steps",
                f"must be <= {self.decay_start}, where the decay over the last "
                f"{self.decay_steps} steps (decay_fraction={decay_fraction} of "
                f"training.max_steps={max_steps}) starts, got {warmup_steps}",
            )
        self.warmup_steps, self.min_lr_ratio, self.max_steps = (
            warmup_steps, min_lr_ratio, max_steps)  # fmt: skip
        self.decay = decay
        self._shape = DECAY_SHAPES[decay]

    def __call__(self, step: int) -> float:
        w, r = self.warmup_steps, self.min_lr_ratio
        if step < w:
            return (step + 1) / w
        if step < self.decay_start:
            return 1.0
        p = min(1.0, (step - self.decay_start) / self.decay_steps)
        return r + (1.0 - r) * self._shape(p)


def build_cosine(options: CosineOptions, max_steps: int) -> CosineSchedule:
    """``cosine`` for a run of ``max_steps`` steps."""
    return CosineSchedule(options.warmup_steps, options.min_lr_ratio, max_steps)


def build_linear(options: LinearOptions, max_steps: int) -> LinearSchedule:
    """``linear`` for a run of ``max_steps`` steps."""
    return LinearSchedule(options.warmup_steps, options.min_lr_ratio, max_steps)


def build_wsd(options: WSDOptions, max_steps: int) -> WSDSchedule:
    """``wsd`` for a run of ``max_steps`` steps."""
    return WSDSchedule(
        options.warmup_steps, options.decay_fraction, options.min_lr_ratio, options.decay,
        max_steps,
    )  # fmt: skip


@slmkit.hookimpl
def register_schedules(register: slmkit.Register) -> None:
    """Provide the ``cosine``, ``linear`` and ``wsd`` schedules."""
    register("cosine", build_cosine, options=CosineOptions)
    register("linear", build_linear, options=LinearOptions)
    register("wsd", build_wsd, options=WSDOptions)
