"""The ``gpt`` block: a GPT-2 style pre-norm transformer block, from PyTorch primitives.

    x = x + attention(layer_norm(x))
    x = x + mlp(layer_norm(x))

Attention is causal multi-head self-attention. By default it runs PyTorch's fused
``scaled_dot_product_attention``; ``attention = "explicit"`` spells the same computation
out (scores, mask, softmax, weighted sum) for reading and for checking the fused path. The
fused path never materializes the attention pattern; when a forward hook watches
``attn.hook_pattern`` it is computed on the side, so watching changes no output. Training
on the CPU with dropout takes the explicit path (see ``CausalSelfAttention.forward``), and
every dropout is slmkit's (:func:`slmkit.dropout`), whose mask is cheaper to draw there.

Hook points (shapes in docs/hooks.md): ``hook_resid_pre``, ``attn.hook_q/k/v``,
``attn.hook_pattern``, ``attn.hook_out``, ``mlp.hook_pre``, ``mlp.hook_post``,
``hook_resid_post``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import slmkit


@attrs.define(frozen=True)
class GPTOptions:
    """Options of the ``gpt`` block (keys of the ``[model]`` table)."""

    attention: str = attrs.field(default="sdpa", validator=slmkit.one_of(("sdpa", "explicit")))
    bias: bool = True


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position attends only to earlier ones."""

    def __init__(self, dims: slmkit.ModelDims, options: GPTOptions) -> None:
        super().__init__()
        self.n_heads, self.d_head = dims.n_heads, dims.d_head
        self.qkv = nn.Linear(dims.d_model, 3 * dims.d_model, bias=options.bias)
        self.proj = nn.Linear(dims.d_model, dims.d_model, bias=options.bias)
        self.dropout = dims.dropout
        self.resid_dropout = slmkit.Dropout(dims.dropout)
        self.explicit = options.attention == "explicit"
        self.hook_q = slmkit.HookPoint()
        self.hook_k = slmkit.HookPoint()
        self.hook_v = slmkit.HookPoint()
        self.hook_pattern = slmkit.HookPoint()
        self.hook_out = slmkit.HookPoint()

    def forward(self, x: torch.Tensor, ctx: slmkit.BlockContext) -> torch.Tensor:
        batch, time, d_model = x.shape
        # (batch, time, 3*d_model) -> (3, batch, n_heads, time, d_head) -> q, k, v: views
        # only, and few of them (in generation every op costs per-token overhead)
        qkv = self.qkv(x).view(batch, time, 3, self.n_heads, self.d_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if ctx.cache is not None:
            k, v = ctx.cache.append(k, v)
        p_drop = self.dropout if self.training else 0.0
        # On the CPU, SDPA with dropout falls back to this same math (scores, softmax,
        # dropout, @ v) but draws its mask with slow bernoulli_: spelled out, it uses
        # slmkit's cheaper dropout instead (a fifth of a reference training step).
        if self.explicit or (p_drop > 0 and q.device.type == "cpu"):
            y = self._explicit(q, k, v, p_drop)
        else:
            if self.hook_pattern.active:
                with torch.no_grad():
                    self.hook_pattern(self._pattern(q, k))
            y = self._fused(q, k, v, p_drop)
        y = y.transpose(1, 2).contiguous().view(batch, time, d_model)  # heads side by side
        y = self.hook_out(self.proj(y))
        # dropout is the identity in eval mode: skipping the call saves overhead per token
        return self.resid_dropout(y) if self.training else y

    def _fused(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p_drop: float
    ) -> torch.Tensor:
        n_queries, n_keys = q.shape[2], k.shape[2]
        if n_queries == n_keys:  # training, or the first step of generation
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)
        mask = None if n_queries == 1 else slmkit.causal_mask(n_queries, n_keys, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)

    def _pattern(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Attention weights (batch, n_heads, queries, keys); each row sums to 1."""
        # Scaled dot products: dividing by sqrt(d_head) keeps the softmax out of saturation
        # (done to q, which is time/keys times smaller than the scores).
        scores = (q * (1 / math.sqrt(self.d_head))) @ k.transpose(-2, -1)
        n_queries, n_keys = q.shape[2], k.shape[2]
        if torch.compiler.is_compiling():
            # The same masking as below, written so that inductor fuses it into one pass
            # per row: indexed by the flattened rows (batch * heads * queries), as a (queries,
            # keys) mask broadcast over batch and heads kept it from fusing the softmax's
            # loops (slower than eager), and added as a bias, whose backward needs no mask.
            rows = scores.view(-1, n_keys)
            # int32 indices: half the vector work of int64 per element in inductor's loops
            index = torch.int32 if rows.shape[0] + n_keys < 2**31 else torch.int64
            query = torch.arange(rows.shape[0], dtype=index, device=q.device) % n_queries
            keys = torch.arange(n_keys, dtype=index, device=q.device)
            future = keys > (query + (n_keys - n_queries))[:, None]
            bias = torch.where(future, float("-inf"), 0.0).to(scores.dtype)
            return (rows + bias).softmax(dim=-1).view(scores.shape)
        future = ~slmkit.causal_mask(n_queries, n_keys, q.device)
        return scores.masked_fill_(future, float("-inf")).softmax(dim=-1)

    def _explicit(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p_drop: float
    ) -> torch.Tensor:
        pattern = self.hook_pattern(self._pattern(q, k))
        return slmkit.dropout(pattern, p_drop) @ v


class MLP(nn.Module):
    """Position-wise feed-forward network: widen, GELU, project back."""

    def __init__(self, dims: slmkit.ModelDims, options: GPTOptions) -> None:
        super().__init__()
        self.fc = nn.Linear(dims.d_model, dims.d_ff, bias=options.bias)
        self.proj = nn.Linear(dims.d_ff, dims.d_model, bias=options.bias)
        self.dropout = slmkit.Dropout(dims.dropout)
        self.hook_pre = slmkit.HookPoint()
        self.hook_post = slmkit.HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.hook_post(F.gelu(self.hook_pre(self.fc(x))))
        out = self.proj(hidden)
        return self.dropout(out) if self.training else out  # identity in eval mode


class GPTBlock(nn.Module):
    """Pre-norm residual block: normalizing before each sublayer keeps deep stacks stable."""

    def __init__(self, options: GPTOptions, dims: slmkit.ModelDims, layer: int) -> None:
        super().__init__()
        self.hook_resid_pre = slmkit.HookPoint()
        self.ln_1 = nn.LayerNorm(dims.d_model, bias=options.bias)
        self.attn = CausalSelfAttention(dims, options)
        self.ln_2 = nn.LayerNorm(dims.d_model, bias=options.bias)
        self.mlp = MLP(dims, options)
        self.hook_resid_post = slmkit.HookPoint()
        slmkit.init_gpt2_weights(self, (self.attn.proj, self.mlp.proj), dims.n_layers)

    def forward(self, x: torch.Tensor, ctx: slmkit.BlockContext) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = x + self.attn(self.ln_1(x), ctx)
        return self.hook_resid_post(x + self.mlp(self.ln_2(x)))

    def decoder(self) -> Callable[[torch.Tensor, slmkit.KVCache, int], torch.Tensor]:
        """The fast sampling step: ``forward`` at one new position, ``x`` ``(batch, d_model)``.

        Prepared for one generation (eval mode, no forward hook watching): the weights are
        bound now, transposed as ``F.linear`` would transpose them at every call. The step
        runs the operations ``forward`` runs on the same values, so it computes the same
        numbers, without the module calls, hook points and reshapes of the heads, which at
        batch 1 cost as much as the matrix products.
        """
        attn, mlp, ln_1, ln_2 = self.attn, self.mlp, self.ln_1, self.ln_2
        qkv, proj, fc, out = (_affine(m) for m in (attn.qkv, attn.proj, mlp.fc, mlp.proj))
        n_heads, d_head, explicit = attn.n_heads, attn.d_head, attn.explicit

        def decode(x: torch.Tensor, cache: slmkit.KVCache, position: int) -> torch.Tensor:
            batch, d_model = x.shape
            h = qkv(F.layer_norm(x, ln_1.normalized_shape, ln_1.weight, ln_1.bias, ln_1.eps))
            q, k, v = h.view(batch, 3, n_heads, 1, d_head).unbind(1)
            keys, values = cache.append(k, v)
            if explicit:
                y = attn._explicit(q, keys, values, 0.0)
            else:  # one query: no mask, as in forward
                y = F.scaled_dot_product_attention(q, keys, values)
            # (batch, n_heads, 1, d_head) holds the heads side by side already
            x = x + proj(y.view(batch, d_model))
            h = fc(F.layer_norm(x, ln_2.normalized_shape, ln_2.weight, ln_2.bias, ln_2.eps))
            return x + out(F.gelu(h))

        return decode


def _affine(linear: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``linear`` on a 2-D input as ``F.linear`` computes it (``addmm``, or ``mm`` without a
    bias), the transposed weight made once."""
    weight, bias = linear.weight.t(), linear.bias
    if bias is None:
        return lambda x: torch.mm(x, weight)
    return lambda x: torch.addmm(bias, x, weight)


@slmkit.hookimpl
def register_blocks(register: slmkit.Register) -> None:
    """Provide the ``gpt`` block."""
    register("gpt", GPTBlock, options=GPTOptions)
