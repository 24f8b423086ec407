"""The ``constant`` learning-rate schedule: the base learning rate at every step."""

from __future__ import annotations

import slmkit


class ConstantSchedule:
    """Multiplier 1.0 at every step."""

    def __call__(self, step: int) -> float:
        return 1.0


@slmkit.hookimpl
def register_schedules(register: slmkit.Register) -> None:
    """Provide the ``constant`` schedule."""
    register("constant", lambda options, max_steps: ConstantSchedule())
