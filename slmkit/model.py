"""The language model: embeddings, a stack of plugin blocks, final norm, linear head.

    tokens -> token embedding + position embedding -> dropout
           -> block 0 -> ... -> block N-1 -> LayerNorm -> head -> logits

The kernel owns this frame; what happens inside a block is the block plugin's business.
``final_norm=False`` leaves out the LayerNorm (the head reads the last block's output);
``init="torch"`` gives every module PyTorch's default initialisation instead of GPT-2's.
``generate`` samples with a KV cache (each layer keeps its keys and values, so a new token
costs one position of work) or, for comparison, by recomputing the whole context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from slmkit.components import BlockContext, KVCache, ModelDims
from slmkit.config.schema import MODEL_INITS
from slmkit.decode import DecodeStep, fast_path_refusal
from slmkit.dropout_mask import Dropout
from slmkit.hookpoint import HookPoint, name_hook_points

IGNORE_INDEX = -100


class FinalNorm(nn.LayerNorm):
    """The LayerNorm before the head, with the hook point ``ln_f.hook_normalized``."""

    def __init__(self, d_model: int) -> None:
        super().__init__(d_model)
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(super().forward(x))


class LanguageModel(nn.Module):
    """A decoder-only language model assembled from ``n_layers`` blocks.

    ``final_norm``: a LayerNorm between the last block and the head (``ln_f``, else None);
    ``init``: ``"gpt2"`` (the blocks' own initialisation, N(0, 0.02) embeddings and head)
    or ``"torch"`` (:func:`reset_to_torch_defaults` once every module is built).
    """

    def __init__(
        self,
        dims: ModelDims,
        make_block: Callable[[int], nn.Module],
        pad_id: int | None = None,
        *,
        learned_positions: bool = True,
        final_norm: bool = True,
        init: str = "gpt2",
    ) -> None:
        super().__init__()
        if init not in MODEL_INITS:
            raise ValueError(f"init must be one of {MODEL_INITS}, got {init!r}")
        self.dims = dims
        self.pad_id = pad_id
        self.tok_emb = nn.Embedding(dims.vocab_size, dims.d_model)
        # Blocks that encode positions themselves (rotary embeddings) need no table.
        self.pos_emb = (
            nn.Embedding(dims.context_length, dims.d_model) if learned_positions else None
        )
        self.hook_embed = HookPoint()
        self.drop = Dropout(dims.dropout)
        self.blocks = nn.ModuleList(make_block(layer) for layer in range(dims.n_layers))
        self.ln_f = FinalNorm(dims.d_model) if final_norm else None
        self.head = nn.Linear(dims.d_model, dims.vocab_size, bias=False)
        if init == "torch":
            reset_to_torch_defaults(self)
        else:
            for module in (self.tok_emb, self.pos_emb, self.head):
                if module is not None:
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)  # GPT-2 initialisation
        #: every hook point, by its module path (``blocks.0.hook_resid_post``...)
        self.hook_points = name_hook_points(self)

    @property
    def n_params(self) -> int:
        """Number of parameters (shared tensors counted once)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def n_non_embedding_params(self) -> int:
        """Parameters outside the vocabulary and position tables: the ``N`` of scaling laws.

        Like Kaplan et al. (2020), the token embedding, the position embedding and the
        output head (the unembedding, a vocabulary table too; the same tensor when tied) are
        left out, so the count does not depend on the tokenizer's vocabulary.
        """
        tables = {id(m.weight) for m in (self.tok_emb, self.pos_emb, self.head) if m is not None}
        return sum(p.numel() for p in self.parameters() if id(p) not in tables)

    def nonfinite_parameters(self) -> list[str]:
        """Names of the parameters that hold a NaN or an infinity (one device read)."""
        named = list(self.named_parameters())
        if not named:
            return []
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist()
        return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]

    def param_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        """Optimizer groups: weight matrices decay; biases, norms and embeddings do not.

        Embeddings are lookup tables, not maps, and decaying norm gains or biases only
        pulls them towards zero without regularising anything. Each group also lists its
        parameters' ``names`` (``blocks.0.attn.qkv.weight``), in the order of ``params``.
        """
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        groups: dict[bool, dict[str, Any]] = {
            decay: {"params": [], "names": [], "lr": learning_rate, "decay": decay}
            for decay in (True, False)
        }
        for name, p in self.named_parameters():  # a tied matrix once, under its first name
            if not p.requires_grad:
                continue
            group = groups[p.dim() >= 2 and id(p) not in embeddings]
            group["params"].append(p)
            group["names"].append(name)
        return [groups[True], groups[False]]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(batch, time, vocab)`` and, given targets, the mean cross-entropy.

        With ``caches`` (one :class:`KVCache` per layer) the positions continue after what
        is cached, and each block appends this call's keys and values.
        """
        start = caches[0].length if caches else 0
        time = idx.shape[1]
        positions = torch.arange(start, start + time, device=idx.device)
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.hook_embed(x)
        if self.training:  # dropout is the identity in eval mode; generation skips the call
            x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, BlockContext(positions, caches[layer] if caches else None))
        logits = self.readout(x)
        if targets is None:
            return logits, None
        return logits, self.loss(logits, targets)

    def readout(self, residual: torch.Tensor) -> torch.Tensor:
        """Logits of a residual stream ``(..., d_model)``: the final norm (if any), the head.

        What the model does to the last block's output; a probe reading an earlier layer's
        residual stream this way gets the logit lens (nostalgebraist, 2020).
        """
        return self.head(residual if self.ln_f is None else self.ln_f(residual))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean next-token cross-entropy the model trains on (padding ignored).

        ``logits`` ``(batch, time, vocab)``, ``targets`` ``(batch, time)``; computed in float32.
        """
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=IGNORE_INDEX if self.pad_id is None else self.pad_id,
        )

    def tie_embeddings(self) -> None:
        """Share one matrix between the token embedding and the head (Press & Wolf, 2017).

        The head's weights become the embedding's, so a token's input vector is also the
        direction its logit reads: fewer parameters, often slightly better small models.
        """
        self.head.weight = self.tok_emb.weight

    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        fast: bool = True,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``prompt`` (shape ``(batch, time)``).

        Draws from ``softmax(logits / temperature)`` restricted by ``top_k`` and ``top_p``
        (see :func:`filter_logits`) with ``generator``, never the global RNG, so sampling
        cannot shift a training run. When the context window is full the cache restarts
        from the last three quarters of it: positions are absolute, so a cache cannot
        simply slide. With the cache, ``fast`` steps one token through the blocks'
        ``decoder`` (:mod:`slmkit.decode`), the same tokens as ``fast=False``, which calls
        ``forward`` for every token (blocks without ``decoder`` always do).
        """
        was_training = self.training
        self.eval()
        # Inference mode is no_grad without autograd's bookkeeping (version counters,
        # view tracking), which is a noticeable share of a one-token step.
        try:
            with torch.inference_mode():
                draw = Draw(temperature, top_k, top_p, generator)
                if not use_cache:
                    out = self._recompute(prompt, max_new_tokens, draw)
                else:
                    out = self._sample(prompt, max_new_tokens, draw, fast)
        finally:
            self.train(was_training)
        # an inference-mode tensor may not be saved for backward: hand back a plain one
        return out.clone()

    def _recompute(self, prompt: torch.Tensor, max_new_tokens: int, draw: Draw) -> torch.Tensor:
        """Sampling without a cache: each token recomputes the last context window."""
        context = self.dims.context_length
        out = _output(prompt, max_new_tokens)
        for n in range(prompt.shape[1], out.shape[1]):
            logits, _ = self(out[:, max(0, n - context) : n])
            out[:, n : n + 1] = draw(logits[:, -1, :])
        return out

    def decode_step(self) -> DecodeStep:
        """The fast decode step of this model (its blocks' decoders), for one generation."""
        return DecodeStep(self.tok_emb, self.pos_emb, self.blocks, self.ln_f, self.head)

    def _sample(
        self, prompt: torch.Tensor, max_new_tokens: int, draw: Draw, fast: bool
    ) -> torch.Tensor:
        """The cached sampling loop of :meth:`generate` (in eval and inference mode)."""
        context = self.dims.context_length
        keep = max(1, context - context // 4)
        n_prompt = prompt.shape[1]
        out = _output(prompt, max_new_tokens)
        # One buffer per layer for the whole generation: a restart reuses it (reset).
        caches = [KVCache(context) for _ in self.blocks]
        step = None
        if fast and fast_path_refusal(self.blocks, list(self.hook_points.values())) is None:
            step = self.decode_step()
        pending = out[:, max(0, n_prompt - context) : n_prompt]  # what the cache lacks
        for n in range(n_prompt, out.shape[1]):
            length = caches[0].length
            if length + pending.shape[1] > context:
                for cache in caches:
                    cache.reset()
                pending, length = out[:, n - keep : n], 0
            if step is not None and length and pending.shape[1] == 1:
                logits = step(pending[:, 0], caches, length)
            else:  # the prompt, a restart, or no fast path
                logits = self(pending, caches=caches)[0][:, -1, :]
            out[:, n : n + 1] = draw(logits)
            pending = out[:, n : n + 1]
        return out


def reset_to_torch_defaults(model: nn.Module) -> None:
    """Give every module of ``model`` PyTorch's default initialisation, in module order.

    Each module that defines ``reset_parameters`` (``nn.Linear``: Kaiming-uniform weights
    and uniform biases within ``1/sqrt(fan_in)``; ``nn.Embedding``: N(0, 1); norms: ones
    and zeros) calls it, drawing from the torch RNG after the blocks built themselves, so
    whatever a block's constructor did to such modules (GPT-2's N(0, 0.02)) is undone.
    Parameters a block holds outside such modules keep the block's own initialisation.
    """
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not model and callable(reset):
            reset()


def _output(prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The tensor sampled tokens are written into, the prompt already in it: no copy of
    the sequence per token."""
    out = prompt.new_empty(prompt.shape[0], prompt.shape[1] + max_new_tokens)
    out[:, : prompt.shape[1]] = prompt
    return out


@attrs.define
class Draw:
    """Draws the next token ``(batch, 1)`` from the last position's logits ``(batch, vocab)``."""

    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        scaled = filter_logits(logits.float() / self.temperature, self.top_k, self.top_p)
        probs = F.softmax(scaled, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator)


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set to -inf every logit that ``top_k`` and ``top_p`` rule out (last dim: vocab).

    ``top_k``: keep the k largest logits (and any tied with the k-th). ``top_p`` (nucleus
    sampling, Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probabilities add up to at least ``top_p``; the most likely token always stays. With
    both, ``top_p`` applies to the distribution that ``top_k`` left, renormalised.
    ``None`` or 0 for ``top_k`` and ``None`` or 1.0 for ``top_p`` mean no limit.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the ones before it already reach top_p (shifting the sum, not
        # subtracting, so a threshold the sum reaches exactly is not missed by rounding)
        before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], -1)
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
