"""The ``lion`` optimizer: EvoLved Sign Momentum (Chen et al., 2023).

Lion was found by program search ("Symbolic Discovery of Optimization Algorithms",
arXiv:2302.06675). It keeps one momentum buffer and steps along the *sign* of an
interpolation between the momentum and the gradient, so every coordinate moves by exactly
``lr`` (plus the decay). For every parameter ``p`` with gradient ``g`` (``m`` starts at
zero)::

    c <- beta1 * m + (1 - beta1) * g       # the update direction
    p <- p - lr * (sign(c) + wd * p)       # decoupled weight decay: decay groups only
    m <- beta2 * m + (1 - beta2) * g       # the momentum, with a longer memory

An experiment uses it with::

    [plugins]
    enable = ["slmkit-lion"]

    [optimizer]
    name = "lion"
    learning_rate = 7e-4      # the paper: 3-10x smaller than AdamW's
    betas = [0.9, 0.99]
    weight_decay = 0.3        # the paper: 3-10x larger than AdamW's

Weight decay applies only to the parameter groups the kernel marks ``decay`` (weight
matrices); biases, norm gains and embeddings are never decayed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
import slmkit
import torch

__version__ = "0.1.0"

#: the component name experiments use: ``[optimizer] name = "lion"``
NAME = "lion"


@attrs.define(frozen=True)
class LionOptions:
    """Options of ``lion`` (keys of the ``[optimizer]`` table besides ``name`` and
    ``learning_rate``)."""

    #: ``[beta1, beta2]``: beta1 mixes momentum and gradient for the step, beta2 is the
    #: momentum's decay; each in [0, 1)
    betas: list[float] = attrs.field(factory=lambda: [0.9, 0.99], validator=slmkit.two_betas)
    #: ``wd``: decoupled weight decay of the ``decay`` groups, >= 0; 0 turns it off
    weight_decay: float = attrs.field(default=0.0, validator=slmkit.non_negative)


class Lion(torch.optim.Optimizer):
    """Lion: sign of an interpolated momentum, decoupled weight decay.

    Per parameter ``p`` with gradient ``g`` (``m`` is the ``exp_avg`` state, zero before
    the first step)::

        c = beta1 * m + (1 - beta1) * g
        p <- p - lr * (sign(c) + wd * p)
        m <- beta2 * m + (1 - beta2) * g

    ``lr``, ``betas`` and ``weight_decay`` may differ per parameter group. The state is one
    tensor per parameter, so ``state_dict()`` / ``load_state_dict()`` resume exactly.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient.

        ``closure`` (optional) re-evaluates the model and returns the loss; it runs with
        gradients enabled.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("lion does not support sparse gradients")
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)  # m starts at 0
                m = state["exp_avg"]
                c = m.mul(beta1).add_(g, alpha=1 - beta1)  # c = beta1 m + (1 - beta1) g
                if wd != 0:
                    p.mul_(1 - lr * wd)  # p <- p - lr * wd * p (decoupled, old p)
                p.add_(c.sign_(), alpha=-lr)  # p <- p - lr * sign(c)
                m.mul_(beta2).add_(g, alpha=1 - beta2)  # m <- beta2 m + (1 - beta2) g
        return loss


def build_lion(options: LionOptions, param_groups: list[dict[str, Any]]) -> Lion:
    """The factory slmkit calls: ``Lion`` over the kernel's parameter groups.

    Each kernel group has ``params``, ``lr`` and ``decay``; only ``decay`` groups get
    ``options.weight_decay``, the others a weight decay of 0.
    """
    groups = slmkit.weight_decay_groups(param_groups, options.weight_decay)
    return Lion(
        groups,
        lr=param_groups[0]["lr"],  # the default only; every kernel group sets its own lr
        betas=(options.betas[0], options.betas[1]),
        weight_decay=options.weight_decay,
    )


@slmkit.hookimpl
def register_optimizers(register: slmkit.Register) -> None:
    """Provide the ``lion`` optimizer."""
    register(NAME, build_lion, options=LionOptions)
