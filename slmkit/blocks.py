"""Pieces every transformer block plugin needs: the causal mask and GPT-2 initialisation.

Block plugins (built-in or third-party) import these rather than writing them again, so
that "causal" and "initialised as GPT-2" mean the same thing in every block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def causal_mask(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """Boolean mask, True where query i may attend to key j.

    The queries are the last ``n_queries`` of the ``n_keys`` positions (with a KV cache the
    keys include earlier steps), so query i sees keys up to ``n_keys - n_queries + i``.
    """
    offset = n_keys - n_queries
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(diagonal=offset)


def init_gpt2_weights(
    block: nn.Module, residual_projections: Iterable[nn.Linear], n_layers: int
) -> None:
    """GPT-2 initialisation of a block's linear layers.

    N(0, 0.02) everywhere, zero biases; the projections that write into the residual
    stream are scaled by 1/sqrt(2 * n_layers), since each layer adds two of them and the
    stream's variance would otherwise grow with depth.
    """
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for proj in residual_projections:
        nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))
