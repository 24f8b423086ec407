"""Hook points: named places in a model where forward hooks watch activations go by.

A block plugin puts a :class:`HookPoint` wherever an activation is worth watching
(``self.hook_q = HookPoint()``, then ``q = self.hook_q(q)`` in ``forward``); the model names
every point by its module path (``blocks.0.attn.hook_q``). With no hook attached a point
costs one attribute check: :class:`HookPoint` bypasses ``nn.Module.__call__``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Observer = Callable[[str, torch.Tensor], None]


class HookPoint(nn.Module):
    """An identity module where forward hooks can watch a tensor go by.

    ``name`` is set by the model to the point's module path. Observers receive
    ``(name, tensor.detach())``; what they return is discarded, so they cannot change the
    model's outputs. The detached tensor shares its data with the model's: the kernel's
    observers (:class:`slmkit.hooks.ForwardHooks`) check that a hook left it unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self.observers: list[Observer] = []

    @property
    def active(self) -> bool:
        """Whether any hook is attached (blocks use it to skip optional work)."""
        return bool(self.observers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Deliberately not nn.Module.__call__: a point nobody watches costs one check.
        if self.observers:
            detached = x.detach()
            for observe in self.observers:
                observe(self.name, detached)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return x


def name_hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Give every :class:`HookPoint` of ``model`` its module path as name; return them."""
    points = {}
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = name
            points[name] = module
    return points
