"""Validators for the attrs option classes of experiments and plugin components.

Every component registers an attrs class for its options; the kernel structures the
component's TOML table into it. Validators from this module raise :class:`OptionValueError`
carrying the field name, so every option error reads the same way:
``experiments/x.toml: optimizer.learning_rate: must be > 0, got -1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import attrs


class OptionValueError(ValueError):
    """An option value out of range; ``key`` is the option's name within its table."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _finite(attribute: attrs.Attribute[Any], value: Any) -> None:
    """Refuse NaN and the infinities, which every comparison below would let through."""
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionValueError(attribute.name, f"must be a finite number, got {value!r}")


def positive(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Require ``value > 0`` (and finite)."""
    _finite(attribute, value)
    if value <= 0:
        raise OptionValueError(attribute.name, f"must be > 0, got {value!r}")


def non_negative(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Require ``value >= 0`` (and finite)."""
    _finite(attribute, value)
    if value < 0:
        raise OptionValueError(attribute.name, f"must be >= 0, got {value!r}")


def in_range(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Validator:
    """Require ``low <= value <= high``, finite; ``low_open``/``high_open`` exclude the ends."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        _finite(attribute, value)
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            raise OptionValueError(
                attribute.name, f"must be in {left}{low}, {high}{right}, got {value!r}"
            )

    return check


def one_of(choices: Collection[Any]) -> Validator:
    """Require ``value`` to be one of ``choices``."""

    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise OptionValueError(attribute.name, f"must be one of {allowed}, got {value!r}")

    return check


def two_betas(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Require two numbers ``[beta1, beta2]``, each in [0, 1) (Adam-style momentum rates)."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise OptionValueError(attribute.name, f"expected two numbers [beta1, beta2], got {value}")
    for beta in value:
        in_range(0, 1, high_open=True)(instance, attribute, beta)


def boolean(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Require ``true`` or ``false`` (also for options built in Python, not from TOML)."""
    if not isinstance(value, bool):
        raise OptionValueError(attribute.name, f"must be true or false, got {value!r}")


@attrs.define(frozen=True)
class NoOptions:
    """The options class of a component that takes none."""
