"""Parameters by role: which layer a parameter belongs to, and weight decay by group.

The kernel hands every optimizer factory its parameter groups, each a dict with
``params``, ``names`` (the parameters' names in the model), ``lr`` and ``decay`` (True
for weight matrices; False for biases, norm gains and embeddings).
:func:`weight_decay_groups` turns ``decay`` into the ``weight_decay`` that torch
optimizers read, so each optimizer plugin does not write that mapping again.
"""

from __future__ import annotations

from typing import Any


def parameter_layer(name: str) -> str:
    """The layer a parameter belongs to: ``blocks.2.attn.qkv.weight`` -> ``blocks.2``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 1 else parts[0]


def weight_decay_groups(
    param_groups: list[dict[str, Any]], weight_decay: float
) -> list[dict[str, Any]]:
    """The kernel's groups as torch groups: ``weight_decay`` on ``decay`` groups, else 0."""
    return [
        {
            "params": group["params"],
            "lr": group["lr"],
            "weight_decay": weight_decay if group["decay"] else 0.0,
        }
        for group in param_groups
    ]
