"""The interfaces that plugin components implement, and the factories that build them.

Plugins register factories (see :mod:`slmkit.hookspecs`); what those factories return must
follow the protocols below. They are structural (``typing.Protocol``): a component needs
the methods, not a base class. Every factory takes the component's options first (an
instance of the attrs class it registered), then what the kernel knows at build time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:  # annotations only: reading run logs must not wait for torch
    import torch


@runtime_checkable
class Tokenizer(Protocol):
    """Turns text into token ids and back; owns its normalization policy.

    ``state_dict()`` must return plain JSON values: the kernel writes it to the run
    folder's ``tokenizer.json`` and embeds it in every checkpoint.
    """

    vocab_size: int
    #: id ignored by the loss (or None when the tokenizer has no padding token)
    pad_id: int | None

    def train(self, text: str) -> None:
        """Fit the vocabulary on the training text (a no-op for fixed vocabularies)."""

    def encode(self, text: str) -> list[int]:
        """Normalize and encode ``text``."""

    def decode(self, ids: Sequence[int]) -> str:
        """Turn ids back into text."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer, as JSON values."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


# Optional fast paths: a tokenizer may also define
#   encode_to_tensor(text: str) -> torch.Tensor   (1-D integer tensor)
# which the data pipeline prefers for whole corpora (vectorized, no per-token Python), and
#   encode_span(text: str, start: int, end: int) -> torch.Tensor
# the same for text[start:end] without slicing it, which the pipeline prefers to both
# (it encodes each split where it lies in the corpus, so no split is copied). A tokenizer
# whose ``train`` is a no-op may set ``needs_training = False``: the pipeline then does not
# copy out the training text to call it. A tokenizer with an unknown-token id may say so with
# ``unk_id``: a run then counts it in the corpus and warns when it exceeds a few percent.


@attrs.define(frozen=True)
class ModelDims:
    """The model-wide sizes every block is built from (the ``[model]`` table).

    ``ModelDims(n_layers, d_model, n_heads, d_ff, dropout, context_length, vocab_size)``,
    all required (tests of a block build one by hand); ``d_head`` is derived.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    dropout: float
    context_length: int
    vocab_size: int

    @property
    def d_head(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads


class KVCache:
    """One layer's cache of attention keys and values during generation.

    Keys and values have shape ``(batch, n_heads, time, d_head)``; ``append`` adds the new
    time steps and returns everything cached so far. They live in a buffer allocated on
    the first append, ``max_length`` time steps long when given (``generate`` passes the
    context length), so a step writes its keys in place instead of copying the whole cache
    (``torch.cat``) as the cache grows. Without ``max_length`` the buffer doubles when full.

    What ``append`` and ``keys``/``values`` return are views of the buffer: they stay
    valid until :meth:`reset`, after which new keys overwrite them. The cache is for
    inference (under ``torch.no_grad``); it does not track gradients through the buffer.

    The contract with blocks (docs/writing-plugins.md, "The KV-cache contract"): a block
    appends exactly each call's keys and values, since the model takes the next start
    position from layer 0's ``length``; with several new queries and a non-empty cache,
    the queries are the last keys (:func:`slmkit.causal_mask`); when the context window
    is full, generation resets every cache and starts again at position 0, so a cache
    never holds more than ``context_length`` steps.
    """

    def __init__(self, max_length: int | None = None) -> None:
        self.max_length = max_length
        self.length = 0  # number of cached time steps
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        """Time steps the buffer holds before it must grow (0 before the first append)."""
        return 0 if self._keys is None else self._keys.shape[2]

    @property
    def keys(self) -> torch.Tensor | None:
        """The cached keys, ``(batch, n_heads, length, d_head)``; None when empty."""
        return None if self._keys is None or not self.length else self._keys[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor | None:
        """The cached values, like :attr:`keys`."""
        if self._values is None or not self.length:
            return None
        return self._values[:, :, : self.length]

    def reset(self) -> None:
        """Forget every cached step; the buffer is kept for reuse."""
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's keys and values; return the full cached keys and values."""
        end = self.length + keys.shape[2]
        if end > self.capacity or not self.length:
            self._reserve(keys, values, end)
        assert self._keys is not None and self._values is not None
        self._keys[:, :, self.length : end] = keys
        self._values[:, :, self.length : end] = values
        self.length = end
        return self._keys[:, :, :end], self._values[:, :, :end]

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, needed: int) -> None:
        """Make the buffer hold ``needed`` steps of tensors like ``keys`` and ``values``."""
        buffer = self._keys
        if (
            buffer is not None
            and self._values is not None
            and needed <= buffer.shape[2]
            and buffer.shape[:2] == keys.shape[:2]
            and buffer.shape[3] == keys.shape[3]
            and self._values.shape[3] == values.shape[3]
            and buffer.dtype == keys.dtype
            and buffer.device == keys.device
        ):
            return  # the first append after a reset, or into a fresh cache that fits
        # At least max_length (one allocation for a whole generation), else double, so
        # appending n steps one at a time copies O(n) in all rather than O(n^2).
        capacity = max(needed, self.max_length or 0, 2 * self.capacity)
        batch, n_heads, _, d_head = keys.shape
        new_keys = keys.new_empty(batch, n_heads, capacity, d_head)
        new_values = values.new_empty(batch, n_heads, capacity, values.shape[3])
        if self.length:
            assert buffer is not None and self._values is not None
            new_keys[:, :, : self.length] = buffer[:, :, : self.length]
            new_values[:, :, : self.length] = self._values[:, :, : self.length]
        self._keys, self._values = new_keys, new_values


@attrs.define
class BlockContext:
    """What a block receives besides the residual stream: ``BlockContext(positions, cache=None)``.

    ``positions``: absolute positions of the time steps in ``x``, shape ``(time,)``:
    ``arange(time)`` in training, continuing after what is cached during generation;
    ``cache``: this layer's :class:`KVCache` during generation, else None.
    """

    positions: torch.Tensor
    cache: KVCache | None = None


class Block(Protocol):
    """A transformer block: ``nn.Module`` mapping ``(batch, time, d_model)`` to the same."""

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """Transform the residual stream ``x``; attend only to earlier positions."""


# Optional fast path: a block may also define
#   decoder() -> Callable[[torch.Tensor, KVCache, int], torch.Tensor]
# a function, made once per generation, computing forward at one new position per sequence
# (``x`` (batch, d_model), cache, position): the same numbers in fewer calls (see
# slmkit/decode.py and docs/writing-plugins.md).


class Corpus(Protocol):
    """Where the training text comes from."""

    def describe(self) -> dict[str, Any]:
        """What the run log records about this corpus (e.g. path, sha256)."""

    def texts(self) -> Iterable[str]:
        """The corpus as one or more texts, in a fixed order."""


# Optional: a corpus whose source is known may also define
#   floor(val_text: str, context_length: int, n_windows: int) -> slmkit.Floor
# the best loss any model can reach on the first ``n_windows`` windows of
# ``context_length + 1`` characters of the validation text (each target predicted from the
# window's own earlier characters only). The kernel calls it once per run when present and
# logs val_floor and val_excess with every evaluation (see slmkit/floor.py).


class Schedule(Protocol):
    """A learning-rate schedule: multiplier of the base learning rate at a step."""

    def __call__(self, step: int) -> float:
        """Multiplier for optimizer step ``step`` (counted from 0)."""


class ForwardHook(Protocol):
    """Observes activations at hook points; built by ``factory(options)``.

    The kernel attaches it to the points its ``[[forward_hooks]]`` table selects (or
    ``default_points``) on the passes named in ``phases``: ``"train"`` on every ``every``-th
    training step, ``"eval"`` on the validation passes of such steps. During the pass
    ``observe`` receives each activation (detached, read-only: a hook that modifies it in
    place fails, naming the hook; work on ``activation.clone()``); afterwards ``flush``
    returns the metrics to log, or None. Under gradient accumulation a training step is
    watched on its first micro-batch only (one ``observe`` per point per step); a
    validation pass calls ``observe`` once per point per validation batch. A hook may
    also define ``start(run)``, called once before training (e.g. to learn
    ``run.run_dir``, a ``pathlib.Path``).
    """

    default_points: Sequence[str]
    phases: Sequence[str]

    def observe(self, point: str, activation: torch.Tensor) -> None:
        """Look at one activation (shapes: docs/hooks.md)."""

    def flush(self, step: int, phase: str) -> dict[str, Any] | None:
        """End of a pass: the metrics to log as a ``forward_hook`` event, or None."""


class UpdateHook(Protocol):
    """Transforms gradients in place before the optimizer step; built by ``factory(options)``.

    ``apply`` runs after backward on every step, in the order of the ``[[update_hooks]]``
    tables. It may return metrics (tensors are fine: they are read only on logging steps,
    when ``log`` is True, and logged as an ``update_hook`` event). A stateful hook defines
    ``state_dict()``/``load_state_dict()`` (tensors and plain values) so resume is exact;
    it may also define ``start(run)``.
    """

    def apply(
        self, parameters: list[tuple[str, torch.nn.Parameter]], step: int, log: bool
    ) -> dict[str, Any] | None:
        """Transform ``p.grad`` of the named parameters at optimizer step ``step`` (from 1)."""


@attrs.define(frozen=True)
class ProbeSetup:
    """What :meth:`Probe.inputs` receives to make the probe's fixed batch (once, at build).

    ``ProbeSetup(dims, tokenizer, generator, val_tokens)``.
    """

    dims: ModelDims
    tokenizer: Tokenizer
    #: seeded with the ``[[probes]]`` table's ``seed``: draw every random choice from it,
    #: never from torch's global RNG
    generator: torch.Generator
    #: the validation split's token ids (1-D, on the CPU), for probes that read real text
    val_tokens: torch.Tensor


@attrs.define(frozen=True)
class ProbeContext:
    """What :meth:`Probe.measure` receives at an evaluation.

    The model is in eval mode and gradients are off; ``tokens`` is the probe's fixed batch
    on the model's device. ``forward(tokens)`` runs the model on ``tokens`` (at most
    ``context_length`` positions) and returns its logits ``(batch, time, vocab)`` and the
    activations at the probe's hook points, ``{point: tensor}`` in the model's order
    (``blocks.0...`` first); only those points are watched, so an attention pattern is
    computed only when the probe asks for it. ``readout(residual)`` maps a residual stream
    through the final norm and the head to logits; ``loss(logits, targets)`` is the mean
    cross-entropy the model trains on.
    """

    model: torch.nn.Module
    tokenizer: Tokenizer
    dims: ModelDims
    #: the optimizer step of this evaluation
    step: int
    tokens: torch.Tensor
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    readout: Callable[[torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Probe(Protocol):
    """Measures the model on inputs of its own at evaluations; built by ``factory(options)``.

    ``points`` are globs of the hook points it reads (each must match a point of the
    model, or the experiment is refused naming the probe and the point). ``inputs(setup)``
    returns its fixed batch of token ids ``(batch, time)``, drawn once with
    ``setup.generator``. At every ``every``-th evaluation (and the last) ``measure(probe)``
    returns its metrics: each a number, a list of numbers (one per layer) or a list of
    lists (``[layer][head]``); tensors are fine. The kernel logs them as a ``probe``
    event. A probe may also define ``start(run)``.
    """

    points: Sequence[str]

    def inputs(self, setup: ProbeSetup) -> torch.Tensor:
        """The probe's fixed batch of token ids, ``(batch, time)``."""

    def measure(self, probe: ProbeContext) -> dict[str, Any]:
        """The metrics of this evaluation."""


# ---------------------------------------------------------------------------------------
# Factories: what ``register(name, factory, options=...)`` receives, one type per kind.
# Options come first; a factory may raise OptionValueError for a bad combination of them.
# ---------------------------------------------------------------------------------------


class TokenizerFactory(Protocol):
    """``factory(options)`` -> a fresh, untrained :class:`Tokenizer`."""

    def __call__(self, options: Any, /) -> Tokenizer: ...


class BlockFactory(Protocol):
    """``factory(options, dims, layer)`` -> the ``nn.Module`` of block ``layer`` (from 0).

    A factory with the attribute ``learned_positions = False`` (a block using rotary
    embeddings, which reads ``ctx.positions``) gets a model without a position table.
    """

    def __call__(self, options: Any, dims: ModelDims, layer: int, /) -> torch.nn.Module: ...


class OptimizerFactory(Protocol):
    """``factory(options, param_groups)`` -> a ``torch.optim.Optimizer``.

    Each group is a dict with ``params``, ``names`` (theirs in the model, in the same
    order), ``lr`` and ``decay`` (True for weight matrices);
    :func:`slmkit.weight_decay_groups` maps ``decay`` to torch's ``weight_decay``.
    """

    def __call__(
        self, options: Any, param_groups: list[dict[str, Any]], /
    ) -> torch.optim.Optimizer: ...


class ScheduleFactory(Protocol):
    """``factory(options, max_steps)`` -> a :class:`Schedule` for a run of that length."""

    def __call__(self, options: Any, max_steps: int, /) -> Schedule: ...


class CorpusFactory(Protocol):
    """``factory(options)`` -> a :class:`Corpus`."""

    def __call__(self, options: Any, /) -> Corpus: ...


class ForwardHookFactory(Protocol):
    """``factory(options)`` -> a :class:`ForwardHook`."""

    def __call__(self, options: Any, /) -> ForwardHook: ...


class UpdateHookFactory(Protocol):
    """``factory(options)`` -> an :class:`UpdateHook`."""

    def __call__(self, options: Any, /) -> UpdateHook: ...


class ProbeFactory(Protocol):
    """``factory(options)`` -> a :class:`Probe`."""

    def __call__(self, options: Any, /) -> Probe: ...


class Register(Protocol):
    """The ``register`` callable every registration hook receives.

    ``register(name, factory, options=OptionsClass)``: ``options`` is an attrs class
    (default: no options); the kernel structures the component's TOML table into it and
    passes the instance to ``factory`` as its first argument.
    """

    def __call__(self, name: str, factory: Callable[..., Any], options: type = ...) -> None: ...
