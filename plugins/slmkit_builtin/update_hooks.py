"""Built-in update hooks: ``clip_grad_norm``, ``grad_stats``, ``grad_noise``, ``grokfast``.

Each runs after backward and before the optimizer step, transforming ``p.grad`` in place,
in the order the experiment's ``[[update_hooks]]`` tables list them.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

import slmkit

Parameters = list[tuple[str, nn.Parameter]]


def _grads(parameters: Parameters) -> list[tuple[str, torch.Tensor]]:
    return [(name, p.grad) for name, p in parameters if p.grad is not None]


@attrs.define(frozen=True)
class ClipOptions:
    """Options of ``clip_grad_norm``."""

    max_norm: float = attrs.field(default=1.0, validator=slmkit.positive)


class ClipGradNorm:
    """Rescale all gradients together so that their global L2 norm is at most ``max_norm``.

    g <- g * min(1, max_norm / ||g||), with ||g|| over every parameter at once. Logs the
    norm before clipping.
    """

    def __init__(self, options: ClipOptions) -> None:
        self.max_norm = options.max_norm

    def apply(self, parameters: Parameters, step: int, log: bool) -> dict[str, Any]:
        """Clip in place; return the pre-clip norm (a tensor: read only when logged)."""
        norm = nn.utils.clip_grad_norm_([p for _, p in parameters], self.max_norm, foreach=True)
        return {"grad_norm": norm}


class GradStats:
    """L2 norm of the gradient of each layer (``blocks.N``, ``tok_emb``...) and in total."""

    def __init__(self, options: Any) -> None:
        pass

    def apply(self, parameters: Parameters, step: int, log: bool) -> dict[str, Any] | None:
        """Only on logging steps: the norms are not needed otherwise."""
        if not log:
            return None
        squares: dict[str, torch.Tensor] = {}
        for name, grad in _grads(parameters):
            layer = slmkit.parameter_layer(name)
            squares[layer] = squares.get(layer, 0) + grad.float().pow(2).sum()
        norms = {layer: total.sqrt() for layer, total in squares.items()}
        norms["total"] = torch.stack(list(squares.values())).sum().sqrt()
        return norms


@attrs.define(frozen=True)
class NoiseOptions:
    """Options of ``grad_noise`` (Neelakantan et al. 2015 use eta in {0.01, 0.3, 1.0})."""

    eta: float = attrs.field(default=0.01, validator=slmkit.positive)
    gamma: float = attrs.field(default=0.55, validator=slmkit.non_negative)


class GradNoise:
    """Add annealed Gaussian noise to the gradients (Neelakantan et al., 2015).

    g <- g + N(0, sigma_t^2) with sigma_t^2 = eta / (1 + t)^gamma, t = step - 1 (so the
    first step has variance eta). Drawn from the run's torch RNG, so resume stays exact.
    """

    def __init__(self, options: NoiseOptions) -> None:
        self.eta, self.gamma = options.eta, options.gamma

    def variance(self, step: int) -> float:
        """sigma_t^2 at optimizer step ``step`` (from 1)."""
        return self.eta / (1 + (step - 1)) ** self.gamma

    def apply(self, parameters: Parameters, step: int, log: bool) -> dict[str, Any]:
        """Add the noise in place."""
        std = self.variance(step) ** 0.5
        for _, grad in _grads(parameters):
            grad.add_(torch.randn_like(grad), alpha=std)
        return {"noise_std": std}


@attrs.define(frozen=True)
class GrokfastOptions:
    """Options of ``grokfast`` (the paper's defaults: alpha 0.98, lamb 2.0)."""

    alpha: float = attrs.field(default=0.98, validator=slmkit.in_range(0, 1, high_open=True))
    lamb: float = attrs.field(default=2.0, validator=slmkit.non_negative)


class Grokfast:
    """Amplify the slow component of the gradients (Grokfast-EMA, Lee et al., 2024).

    An exponential moving average of each gradient is a low-pass filter:
        h <- alpha * h + (1 - alpha) * g      (h starts as the first gradient)
        g <- g + lamb * h
    The averages are this hook's state, saved in checkpoints.
    """

    def __init__(self, options: GrokfastOptions) -> None:
        self.alpha, self.lamb = options.alpha, options.lamb
        self.ema: dict[str, torch.Tensor] = {}

    def apply(self, parameters: Parameters, step: int, log: bool) -> None:
        """Update the averages, then add ``lamb`` times them to the gradients."""
        for name, grad in _grads(parameters):
            ema = self.ema.get(name)
            if ema is None:
                ema = self.ema[name] = grad.detach().clone()
            else:
                if ema.device != grad.device:  # restored from a checkpoint onto the CPU
                    ema = self.ema[name] = ema.to(grad.device)
                ema.mul_(self.alpha).add_(grad, alpha=1 - self.alpha)
            grad.add_(ema, alpha=self.lamb)

    def state_dict(self) -> dict[str, Any]:
        """The moving averages."""
        return {"ema": dict(self.ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the moving averages (moved to the gradients' device on first use)."""
        self.ema = {name: t.clone() for name, t in state.get("ema", {}).items()}


@slmkit.hookimpl
def register_update_hooks(register: slmkit.Register) -> None:
    """Provide ``clip_grad_norm``, ``grad_stats``, ``grad_noise`` and ``grokfast``."""
    register("clip_grad_norm", ClipGradNorm, options=ClipOptions)
    register("grad_stats", GradStats)
    register("grad_noise", GradNoise, options=NoiseOptions)
    register("grokfast", Grokfast, options=GrokfastOptions)
