"""The ``sgd_momentum`` optimizer: stochastic gradient descent with momentum.

This distribution is the template for third-party slmkit plugins: one module, one hook
implementation, one component with an attrs options class. slmkit finds it through the
entry point ``[project.entry-points.slmkit]`` in ``pyproject.toml``; an experiment uses it
with::

    [plugins]
    enable = ["slmkit-sgd-momentum"]

    [optimizer]
    name = "sgd_momentum"
    learning_rate = 0.1
    momentum = 0.9
    weight_decay = 0.0
    nesterov = false

The update, for every parameter ``p`` with gradient ``g``, learning rate ``lr``, momentum
``mu`` and weight decay ``wd`` (the velocity ``v`` starts at zero)::

    v <- mu * v + g
    p <- p - lr * wd * p          (decoupled weight decay; decay groups only)
    p <- p - lr * v               (heavy ball)
    p <- p - lr * (g + mu * v)    (Nesterov, with the v just updated)

Weight decay is *decoupled* (Loshchilov & Hutter, 2019), as in slmkit's ``adamw``: it
shrinks the weights directly, by ``lr * wd`` of their value each step, and never enters the
velocity. It applies only to the parameter groups the kernel marks ``decay`` (weight
matrices); biases, norm gains and embeddings are never decayed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
import slmkit
import torch

__version__ = "0.1.0"

#: the component name experiments use: ``[optimizer] name = "sgd_momentum"``
NAME = "sgd_momentum"


@attrs.define(frozen=True)
class SGDMomentumOptions:
    """Options of ``sgd_momentum`` (keys of the ``[optimizer]`` table besides ``name``
    and ``learning_rate``)."""

    #: ``mu``: the fraction of the velocity kept each step, in [0, 1); 0 is plain SGD
    momentum: float = attrs.field(default=0.9, validator=slmkit.in_range(0, 1, high_open=True))
    #: ``wd``: decoupled weight decay of the ``decay`` groups, >= 0; 0 turns it off
    weight_decay: float = attrs.field(default=0.0, validator=slmkit.non_negative)
    #: step along ``g + mu * v`` (Nesterov's look-ahead) instead of ``v`` (heavy ball)
    nesterov: bool = attrs.field(default=False, validator=slmkit.boolean)


class SGDMomentum(torch.optim.Optimizer):
    """SGD with heavy-ball or Nesterov momentum and decoupled weight decay.

    Per parameter ``p`` with gradient ``g`` (``v`` is the ``momentum_buffer`` state, zero
    before the first step)::

        v <- mu * v + g
        p <- p - lr * wd * p            (only where the group's weight_decay > 0)
        p <- p - lr * v                 (nesterov=False: heavy ball)
        p <- p - lr * (g + mu * v)      (nesterov=True)

    Every hyperparameter (``lr``, ``momentum``, ``weight_decay``, ``nesterov``) may differ
    per parameter group. The state is one tensor per parameter, so ``state_dict()`` /
    ``load_state_dict()`` resume the trajectory exactly.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient.

        ``closure`` (optional) re-evaluates the model and returns the loss, as in every
        ``torch.optim`` optimizer; it runs with gradients enabled.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            wd, nesterov = group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("sgd_momentum does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)  # v starts at 0
                v = state["momentum_buffer"]
                v.mul_(mu).add_(g)  # v <- mu * v + g
                if wd != 0:
                    p.mul_(1 - lr * wd)  # p <- p - lr * wd * p (decoupled)
                if nesterov:
                    p.add_(g.add(v, alpha=mu), alpha=-lr)  # p <- p - lr * (g + mu * v)
                else:
                    p.add_(v, alpha=-lr)  # p <- p - lr * v
        return loss


def build_sgd_momentum(
    options: SGDMomentumOptions, param_groups: list[dict[str, Any]]
) -> SGDMomentum:
    """The factory slmkit calls: ``SGDMomentum`` over the kernel's parameter groups.

    Each kernel group has ``params``, ``lr`` and ``decay``; only ``decay`` groups get
    ``options.weight_decay``, the others a weight decay of 0.
    """
    groups = slmkit.weight_decay_groups(param_groups, options.weight_decay)
    return SGDMomentum(
        groups,
        lr=param_groups[0]["lr"],  # the default only; every kernel group sets its own lr
        momentum=options.momentum,
        weight_decay=options.weight_decay,
        nesterov=options.nesterov,
    )


@slmkit.hookimpl
def register_optimizers(register: slmkit.Register) -> None:
    """Provide the ``sgd_momentum`` optimizer (the only hook this plugin implements)."""
    register(NAME, build_sgd_momentum, options=SGDMomentumOptions)
