"""Dropout with a mask that is cheap to draw on the CPU.

Dropout zeroes each element with probability ``p`` during training and scales the rest by
``1 / (1 - p)``, so the expected value of every element is unchanged.

On CUDA, ``F.dropout`` is one fused kernel and is used as it is. On the CPU it draws its
mask with ``bernoulli_``, one random number per element, which made it the largest single
cost of a training step of the reference model (27 % of the op time, more than all the
matrix products of the forward pass). Here the mask comes from 64 random bits at a time:
``random_`` fills int64s, read as four 16-bit numbers each, and an element is kept when its
number is at or above a threshold. That is about 2.5x cheaper, forward and backward.

The price is that ``p`` is rounded to a multiple of 1/65536 (0.1 becomes 0.1000061); the
kept elements are scaled by the rounded ``1 / (1 - p)``, so the expectation stays exact.
The bits come from torch's default generator, so ``torch.manual_seed`` and a checkpoint's
RNG state make it reproducible like any other random draw.

Under ``torch.compile`` the draw is one opaque operator, ``slmkit::dropout_keep`` (dynamo
cannot trace the in-place ``random_``, and broke the graph at every dropout): the compiled
step draws exactly the bits the eager step draws, in the same order (each draw takes the
tensor it masks as input, so no compiler pass can merge, reorder or recompute draws), and
the scale and product around it fuse with their neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # 16-bit numbers: p is rounded to a multiple of 1/65536


@torch.library.custom_op(
    "slmkit::dropout_keep", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def keep_mask(x: torch.Tensor, dropped: int) -> torch.Tensor:
    """Which elements of ``x`` dropout keeps: 1 or 0 as uint8, shaped like ``x`` (unread).

    Each is kept with probability ``1 - dropped / 65536``: its 16-bit number, four to an
    int64 word drawn by ``random_`` from the default generator, is at or above a threshold.
    uint8 rather than bool: converting it to a float dtype is several times cheaper, eager
    and compiled (bool to bf16 took longer than the product it feeds).
    """
    n_words = -(-x.numel() // 4)  # four 16-bit numbers per int64
    # random_ over the whole int64 range: every one of the 64 bits is uniform.
    words = torch.empty(n_words, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    numbers = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform on -32768..32767
    keep = numbers >= dropped - _LEVELS // 2  # P(keep) = 1 - dropped / 65536
    return keep.view(torch.uint8)


@keep_mask.register_fake
def _keep_mask_shape(x: torch.Tensor, dropped: int) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with a cheaper mask on the CPU."""
    if not training or p == 0:
        return x
    dropped = round(p * _LEVELS)  # how many of the 65536 levels drop an element
    if x.device.type != "cpu" or not 0 < dropped < _LEVELS:
        return F.dropout(x, p, training=True)
    keep = keep_mask(x.detach(), dropped)  # no gradient flows through a draw
    # One tensor holding 0 or the scale: the product needs it alone for its backward.
    scale = keep.to(x.dtype).mul_(_LEVELS / (_LEVELS - dropped))
    return x * scale


class Dropout(nn.Module):
    """A drop-in for ``nn.Dropout`` that uses :func:`dropout`."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
