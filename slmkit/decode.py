"""The fast decode step of sampling: one new token per sequence, as few calls as eager allows.

With a KV cache, a step of :meth:`slmkit.model.LanguageModel.generate` costs a few
matrix-vector products; at batch 1 on a CPU, the ``nn.Module`` calls, views and small ops
around them (about 500 aten calls a token through ``forward``) took as long again. A block
that defines

    decoder() -> decode(x, cache, position) -> torch.Tensor

gives, once per generation, a function that takes one position per sequence, ``x`` of
shape ``(batch, d_model)`` at absolute position ``position`` (an int, ``cache.length``
before the call), appends that position's keys and values to ``cache`` (its layer's
:class:`slmkit.KVCache`) and returns what ``forward`` would return at that position,
``(batch, d_model)``: the same operations on the same values, so the same numbers bit for
bit, with the module calls and hook points left out (and whatever can be prepared once,
such as transposed weights, prepared in ``decoder``). :class:`DecodeStep` chains them
between the model's embeddings and its head. Prompts, restarts past the context window
and models whose blocks lack ``decoder`` go through ``forward`` as before (the last said
once per block class, see :func:`fast_path_refusal`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.components import KVCache
from slmkit.hookpoint import HookPoint

#: where the note of a block without ``decoder`` goes (shown once per block class; Python
#: prints a warning of an unconfigured logger as its bare message on stderr)
logger = logging.getLogger(__name__)
_noted: set[str] = set()

Decode = Callable[[torch.Tensor, KVCache, int], torch.Tensor]


def fast_path_refusal(blocks: Iterable[nn.Module], hook_points: Sequence[HookPoint]) -> str | None:
    """Why sampling cannot take :class:`DecodeStep` (None: it can).

    A block without ``decoder`` is noted once per class (the sample is the same, only
    slower); an active hook point (a forward hook watching) needs ``forward``, silently.
    """
    if any(point.active for point in hook_points):
        return "a forward hook is watching"
    for block in blocks:
        if not callable(getattr(block, "decoder", None)):
            name = type(block).__qualname__
            reason = f"block {name} has no decoder()"
            if name not in _noted:
                _noted.add(name)
                logger.warning(f"note: {reason}: sampling takes the slower path through forward")
            return reason
    return None


class DecodeStep:
    """Logits ``(batch, vocab)`` of one new token per sequence, through the blocks' decoders.

    Exactly what ``model(tokens[:, None], caches=caches)[0][:, -1]`` computes (the same
    operations, fewer calls), for a model whose every block has ``decoder``. Made for one
    generation: the decoders bind the weights as they are when it is made.
    """

    def __init__(
        self,
        tok_emb: nn.Embedding,
        pos_emb: nn.Embedding | None,
        blocks: Iterable[nn.Module],
        ln_f: nn.LayerNorm | None,
        head: nn.Linear,
    ) -> None:
        self.tok_emb = tok_emb.weight
        self.pos_emb = None if pos_emb is None else pos_emb.weight
        self.decodes: list[Decode] = [cast(Any, block).decoder() for block in blocks]
        self.ln_f = ln_f
        self.head = head

    def __call__(self, tokens: torch.Tensor, caches: list[KVCache], position: int) -> torch.Tensor:
        """Logits after ``tokens`` ``(batch,)`` at ``position``; each cache gets its keys."""
        x = F.embedding(tokens, self.tok_emb)
        if self.pos_emb is not None:
            x = x + self.pos_emb[position]
        for decode, cache in zip(self.decodes, caches, strict=True):
            x = decode(x, cache, position)
        ln_f = self.ln_f
        if ln_f is not None:  # model.final_norm = false: the head reads the blocks' output
            x = F.layer_norm(x, ln_f.normalized_shape, ln_f.weight, ln_f.bias, ln_f.eps)
        return F.linear(x, self.head.weight, self.head.bias)
