"""The ``muon`` optimizer: Muon for the blocks' weight matrices, AdamW for the rest.

Muon (Jordan et al., 2024; ``torch.optim.Muon``) replaces each 2-D update by an
orthogonalised one, computed with a few Newton-Schulz steps: an update rule for hidden
weight matrices, not for lookup tables, the output head or vectors. So the parameters
split by role, from their names:

    Muon   the blocks' 2-D weights (``slmkit.parameter_layer(name)`` is ``blocks.N``, and
           the kernel marks them ``decay``): attention and MLP linear weights
    AdamW  everything else: token and position embeddings, the output head (tied or not),
           the final norm, every norm gain and bias, any block parameter that is not 2-D

Muon's learning rate is the experiment's ``optimizer.learning_rate`` (logged as ``lr``);
AdamW's is the ``adamw_lr`` option. The trainer scales every group's own base rate by the
schedule, so both parts follow it. Both weight decays are decoupled; AdamW's applies only
to the groups the kernel marks ``decay`` (an untied head), as in ``adamw``.

It is one optimizer object (:class:`MuonAdamW`): its ``param_groups`` are the Muon group
then the two AdamW groups, and its ``state`` is one dict that both inner optimizers use
(their parameters are disjoint), so the kernel's schedule, grad clipping, skipped-update
undo and checkpoints see one ordinary ``torch.optim.Optimizer``, and ``state_dict()`` /
``load_state_dict()`` resume it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

import slmkit


@attrs.define(frozen=True)
class MuonOptions:
    """Options of ``muon`` (keys of the ``[optimizer]`` table)."""

    #: Muon's momentum: the decay rate of its gradient average, in [0, 1)
    momentum: float = attrs.field(default=0.95, validator=slmkit.in_range(0, 1, high_open=True))
    #: Nesterov momentum (the update looks ahead along the average)
    nesterov: bool = attrs.field(default=True, validator=slmkit.boolean)
    #: Newton-Schulz iterations that orthogonalise each update (torch allows 1 to 99)
    ns_steps: int = attrs.field(default=5, validator=slmkit.in_range(1, 99))
    #: decoupled weight decay of the Muon matrices: p <- p - lr * weight_decay * p
    weight_decay: float = attrs.field(default=0.1, validator=slmkit.non_negative)
    #: Muon's per-matrix rate: "original" lr * sqrt(max(1, rows / cols)); "match_rms_adamw"
    #: lr * 0.2 * sqrt(max(rows, cols)), an update as large as AdamW's at the same lr
    adjust_lr: str = attrs.field(
        default="original", validator=slmkit.one_of(("original", "match_rms_adamw"))
    )
    #: AdamW's learning rate (embeddings, head, norms, biases), scaled by the schedule
    adamw_lr: float = attrs.field(default=3e-4, validator=slmkit.positive)
    adamw_betas: list[float] = attrs.field(factory=lambda: [0.9, 0.95], validator=slmkit.two_betas)
    #: AdamW's decoupled weight decay, on ``decay`` groups only (an untied head)
    adamw_weight_decay: float = attrs.field(default=0.1, validator=slmkit.non_negative)
    adamw_eps: float = attrs.field(default=1e-8, validator=slmkit.positive)


def is_hidden_matrix(name: str, parameter: torch.Tensor, decay: bool) -> bool:
    """Whether Muon updates this parameter: a 2-D weight of a block, marked ``decay``."""
    in_block = slmkit.parameter_layer(name).startswith("blocks.")
    return in_block and decay and parameter.dim() == 2


class MuonAdamW(torch.optim.Optimizer):
    """Muon over the hidden matrices and AdamW over the rest, as one optimizer.

    ``groups`` are the kernel's (``params``, ``names``, ``lr``, ``decay``); their ``lr`` is
    Muon's, ``options.adamw_lr`` AdamW's.
    """

    def __init__(self, groups: list[dict[str, Any]], options: MuonOptions) -> None:
        muon: list[torch.Tensor] = []
        adamw: dict[bool, list[torch.Tensor]] = {True: [], False: []}
        for group in groups:
            for name, p in zip(group["names"], group["params"], strict=True):
                hidden = is_hidden_matrix(name, p, group["decay"])
                (muon if hidden else adamw[group["decay"]]).append(p)
        self.muon = torch.optim.Muon(
            [{"params": muon, "lr": groups[0]["lr"]}],
            weight_decay=options.weight_decay,
            momentum=options.momentum,
            nesterov=options.nesterov,
            ns_steps=options.ns_steps,
            adjust_lr_fn=options.adjust_lr,
        )
        devices = {p.device.type for g in groups for p in g["params"]}
        adamw_groups = [
            {"params": adamw[True], "weight_decay": options.adamw_weight_decay},
            {"params": adamw[False], "weight_decay": 0.0},
        ]
        self.adamw = torch.optim.AdamW(
            adamw_groups,
            lr=options.adamw_lr,
            betas=(options.adamw_betas[0], options.adamw_betas[1]),
            eps=options.adamw_eps,
            # one fused kernel where torch has it (as adamw's "auto"): the same mathematics
            fused=devices <= {"cpu", "cuda"},
        )
        # the inner optimizers' group dicts themselves: a rate set here is theirs
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this one's groups and its one state dict."""
        n_muon = len(self.muon.param_groups)
        self.muon.param_groups = self.param_groups[:n_muon]
        self.adamw.param_groups = self.param_groups[n_muon:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, then the inner optimizers shown the new groups and state."""
        super().load_state_dict(state_dict)  # replaces self.param_groups and self.state
        self._share()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Muon step and one AdamW step (``closure``: re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def build_muon(options: MuonOptions, param_groups: list[dict[str, Any]]) -> MuonAdamW:
    """Muon over the blocks' matrices at ``optimizer.learning_rate``, AdamW over the rest."""
    return MuonAdamW(param_groups, options)


@slmkit.hookimpl
def register_optimizers(register: slmkit.Register) -> None:
    """Provide the ``muon`` optimizer."""
    register("muon", build_muon, options=MuonOptions)
