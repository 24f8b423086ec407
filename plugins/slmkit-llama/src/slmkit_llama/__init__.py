"""The ``llama`` block: a LLaMA-style pre-norm transformer block for slmkit.

    x = x + attention(rms_norm(x))      # rotary position embeddings on q and k
    x = x + swiglu(rms_norm(x))

Three changes from the GPT-2 block (Touvron et al., 2023, "LLaMA: Open and Efficient
Foundation Language Models"):

- **RMSNorm** (Zhang & Sennrich, 2019): ``x / sqrt(mean(x^2) + eps) * g``; no mean
  subtraction, no bias.
- **SwiGLU** MLP (Shazeer, 2020, "GLU Variants Improve Transformer"):
  ``W_down (silu(W_gate x) * (W_up x))``.
- **Rotary position embeddings**, RoPE (Su et al., 2021, "RoFormer: Enhanced Transformer
  with Rotary Position Embedding"): queries and keys are rotated by an angle proportional
  to their absolute position, so ``q . k`` depends only on the *relative* position. The
  block reads the absolute positions from ``ctx.positions``, so cached generation rotates
  each new token by its true position; the cache holds keys already rotated. The block
  class says ``learned_positions = False``: the model gets no learned position table.

An experiment uses it with::

    [plugins]
    enable = ["slmkit-llama"]

    [model]
    block = "llama"
    rope_base = 10000.0
    bias = false
    hidden_size = 0        # 0: round(8/3 * d_model) up to a multiple of 8

``[model] d_ff`` is not used by this block: the SwiGLU width is ``hidden_size``, or, when
that is 0, LLaMA's rule ``8/3 * d_model`` rounded up to a multiple of 8 (three matrices of
that width hold as many weights as GPT's two of width ``4 * d_model``).

Hook points (the ``gpt`` block's, plus two): ``hook_resid_pre``, ``attn.hook_q/k/v``
(before rotation, ``(B, H, T, d_head)``), ``attn.hook_rot_q/hook_rot_k`` (after rotation),
``attn.hook_pattern`` (computed on the side only while a hook watches it),
``attn.hook_out``, ``mlp.hook_pre`` (the gate's pre-activation), ``mlp.hook_pre_linear``
(the up projection), ``mlp.hook_post`` (``silu(gate) * up``), ``hook_resid_post``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import slmkit
import torch
import torch.nn.functional as F
from torch import nn

__version__ = "0.1.0"

#: the component name experiments use: ``[model] block = "llama"``
NAME = "llama"


@attrs.define(frozen=True)
class LlamaOptions:
    """Options of the ``llama`` block (keys of the ``[model]`` table)."""

    #: the RoPE base b: pair i of a head rotates by position * b^(-2i / d_head)
    rope_base: float = attrs.field(default=10000.0, validator=slmkit.positive)
    #: biases in the linear maps (LLaMA has none)
    bias: bool = attrs.field(default=False, validator=slmkit.boolean)
    #: SwiGLU hidden width; 0: round(8/3 * d_model) up to a multiple of 8
    hidden_size: int = attrs.field(default=0, validator=slmkit.non_negative)
    #: the RMSNorm epsilon
    norm_eps: float = attrs.field(default=1e-5, validator=slmkit.positive)


def swiglu_hidden_size(d_model: int, hidden_size: int = 0, multiple_of: int = 8) -> int:
    """The SwiGLU width: ``hidden_size`` if given, else ``8/3 * d_model`` rounded up."""
    if hidden_size > 0:
        return hidden_size
    width = int(8 * d_model / 3)
    return multiple_of * math.ceil(width / multiple_of)


# -- rotary position embeddings ---------------------------------------------------------------


def rope_angles(
    positions: torch.Tensor, d_head: int, base: float = 10000.0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the rotation angles, each ``(time, d_head / 2)``.

    Pair i at position m rotates by ``theta_i * m`` with ``theta_i = base^(-2i / d_head)``:
    the first pairs turn fast (local order), the last ones slowly (long range). The angles
    are computed in float32 (float64 for float64 inputs), then cast to ``dtype``.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    exponent = torch.arange(0, d_head, 2, device=positions.device, dtype=work) / d_head
    inv_freq = base**-exponent  # theta_i
    angles = positions.to(work)[:, None] * inv_freq[None, :]
    out = dtype or work
    return angles.cos().to(out), angles.sin().to(out)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate ``x`` (``(..., time, d_head)``) by its absolute ``positions`` (``(time,)``).

    Dimension i is paired with dimension ``i + d_head/2`` (the "rotate half" layout of
    GPT-NeoX and Hugging Face's LLaMA; Su et al. pair neighbours ``(2i, 2i+1)``, which is the
    same rotation up to a fixed permutation of the head's dimensions). Each pair
    ``(x1, x2)`` becomes ``(x1 cos a - x2 sin a, x1 sin a + x2 cos a)``: a rotation, so norms
    are preserved, and ``R(m)q . R(n)k = q . R(n - m)k`` depends only on ``n - m``.
    """
    d_head = x.shape[-1]
    if d_head % 2:
        raise ValueError(f"rotary embeddings need an even head width, got {d_head}")
    return rotate(x, *rope_angles(positions, d_head, base, dtype=x.dtype))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each pair ``(x1, x2)`` of ``x`` turned by the angles of :func:`rope_angles`."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# -- the block --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain (Zhang & Sennrich, 2019)."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class RotaryAttention(nn.Module):
    """Causal multi-head self-attention with rotary embeddings on queries and keys."""

    def __init__(self, dims: slmkit.ModelDims, options: LlamaOptions) -> None:
        super().__init__()
        self.n_heads, self.d_head = dims.n_heads, dims.d_head
        self.rope_base = options.rope_base
        self.qkv = nn.Linear(dims.d_model, 3 * dims.d_model, bias=options.bias)
        self.proj = nn.Linear(dims.d_model, dims.d_model, bias=options.bias)
        self.dropout = dims.dropout
        self.resid_dropout = nn.Dropout(dims.dropout)
        self.hook_q = slmkit.HookPoint()
        self.hook_k = slmkit.HookPoint()
        self.hook_v = slmkit.HookPoint()
        self.hook_rot_q = slmkit.HookPoint()
        self.hook_rot_k = slmkit.HookPoint()
        self.hook_pattern = slmkit.HookPoint()
        self.hook_out = slmkit.HookPoint()

    def forward(self, x: torch.Tensor, ctx: slmkit.BlockContext) -> torch.Tensor:
        batch, time, d_model = x.shape
        q, k, v = (
            t.view(batch, time, self.n_heads, self.d_head).transpose(1, 2)
            for t in self.qkv(x).split(d_model, dim=2)
        )
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        # rotate by the absolute positions: during generation these continue after the cache
        q = self.hook_rot_q(apply_rope(q, ctx.positions, self.rope_base))
        k = self.hook_rot_k(apply_rope(k, ctx.positions, self.rope_base))
        if ctx.cache is not None:
            k, v = ctx.cache.append(k, v)  # cached keys are stored already rotated
        if self.hook_pattern.active:
            with torch.no_grad():
                self.hook_pattern(self._pattern(q, k))
        y = self._attend(q, k, v, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(batch, time, d_model)
        return self.resid_dropout(self.hook_out(self.proj(y)))

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        n_queries, n_keys = q.shape[2], k.shape[2]
        if n_queries == n_keys:  # training, or the first step of generation
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        mask = None if n_queries == 1 else slmkit.causal_mask(n_queries, n_keys, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)

    def _pattern(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(batch, n_heads, queries, keys)``; each row sums to 1."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
        mask = slmkit.causal_mask(q.shape[2], k.shape[2], q.device)
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


class SwiGLU(nn.Module):
    """The gated MLP: ``W_down (silu(W_gate x) * (W_up x))``."""

    def __init__(self, dims: slmkit.ModelDims, options: LlamaOptions) -> None:
        super().__init__()
        hidden = swiglu_hidden_size(dims.d_model, options.hidden_size)
        self.gate = nn.Linear(dims.d_model, hidden, bias=options.bias)
        self.up = nn.Linear(dims.d_model, hidden, bias=options.bias)
        self.down = nn.Linear(hidden, dims.d_model, bias=options.bias)
        self.dropout = nn.Dropout(dims.dropout)
        self.hook_pre = slmkit.HookPoint()
        self.hook_pre_linear = slmkit.HookPoint()
        self.hook_post = slmkit.HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.hook_pre(self.gate(x))
        up = self.hook_pre_linear(self.up(x))
        hidden = self.hook_post(F.silu(gate) * up)
        return self.dropout(self.down(hidden))


class LlamaBlock(nn.Module):
    """Pre-norm residual block with RMSNorm, rotary attention and a SwiGLU MLP."""

    #: positions are encoded by rotating q and k: the model needs no position table
    learned_positions = False

    def __init__(self, options: LlamaOptions, dims: slmkit.ModelDims, layer: int) -> None:
        super().__init__()
        if dims.d_head % 2:
            raise slmkit.OptionValueError(
                "n_heads",
                f"the llama block needs an even head width d_model / n_heads for its "
                f"rotary embeddings, got {dims.d_model} / {dims.n_heads} = {dims.d_head}",
            )
        self.layer = layer
        self.hook_resid_pre = slmkit.HookPoint()
        self.norm_1 = RMSNorm(dims.d_model, options.norm_eps)
        self.attn = RotaryAttention(dims, options)
        self.norm_2 = RMSNorm(dims.d_model, options.norm_eps)
        self.mlp = SwiGLU(dims, options)
        self.hook_resid_post = slmkit.HookPoint()
        slmkit.init_gpt2_weights(self, (self.attn.proj, self.mlp.down), dims.n_layers)

    def forward(self, x: torch.Tensor, ctx: slmkit.BlockContext) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = x + self.attn(self.norm_1(x), ctx)
        return self.hook_resid_post(x + self.mlp(self.norm_2(x)))

    def decoder(self) -> Callable[[torch.Tensor, slmkit.KVCache, int], torch.Tensor]:
        """The fast sampling step: ``forward`` at one new position, ``x`` ``(batch, d_model)``.

        Made once per generation (eval mode, no hook watching). It runs the operations
        ``forward`` runs, on the same values, so sampling gives the same tokens; what it
        leaves out is the module calls, hook points and the heads' reshapes around them.
        """
        attn, mlp = self.attn, self.mlp
        n_heads, d_head, base = attn.n_heads, attn.d_head, attn.rope_base

        def decode(x: torch.Tensor, cache: slmkit.KVCache, position: int) -> torch.Tensor:
            batch, d_model = x.shape
            qkv = F.linear(self.norm_1(x), attn.qkv.weight, attn.qkv.bias)
            q, k, v = qkv.view(batch, 3, n_heads, 1, d_head).unbind(1)
            at = torch.arange(position, position + 1, device=x.device)  # absolute, as in forward
            cos, sin = rope_angles(at, d_head, base, dtype=q.dtype)  # once, for q and k
            keys, values = cache.append(rotate(k, cos, sin), v)
            y = attn._attend(rotate(q, cos, sin), keys, values, 0.0)
            # (batch, n_heads, 1, d_head) holds the heads side by side already
            x = x + F.linear(y.view(batch, d_model), attn.proj.weight, attn.proj.bias)
            h = self.norm_2(x)
            gate = F.linear(h, mlp.gate.weight, mlp.gate.bias)
            up = F.linear(h, mlp.up.weight, mlp.up.bias)
            return x + F.linear(F.silu(gate) * up, mlp.down.weight, mlp.down.bias)

        return decode


@slmkit.hookimpl
def register_blocks(register: slmkit.Register) -> None:
    """Provide the ``llama`` block."""
    register(NAME, LlamaBlock, options=LlamaOptions)
