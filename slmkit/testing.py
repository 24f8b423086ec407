"""Helpers for the tests of a plugin: load it, build a tiny model, train a tiny run, check a cache.

This module is public, for tests: a plugin's tests may ``import slmkit.testing`` besides
the plugin API (``import slmkit``), and need nothing else of the kernel (no plugin
manager, no experiment loading, no trainer). The plugin's own code must not import it.
It needs no test framework: a failed check raises ``AssertionError``.

    load_plugin(plugin)              what the plugin registers, as ``slmkit plugins`` sees it
    tiny_model(block, plugins)       a small model built with a block component, by name
    train_tiny(plugins, steps=...)   a few training steps in a folder: run folder, losses, model
    check_kv_cache(model)            cached logits against a full forward pass, within atol
    check_decode(model)              the blocks' decoder against forward, bit for bit

``plugins`` arguments take plugin objects (a module with ``@slmkit.hookimpl`` functions,
added inline and enabled) and strings (the distribution names of installed plugins, loaded
from their entry points and enabled); the built-ins always take part.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import attrs
import torch

from slmkit.build import build_model
from slmkit.components import KVCache, Tokenizer
from slmkit.config.resolve import experiment_from_dict
from slmkit.errors import PluginError
from slmkit.model import LanguageModel
from slmkit.plugins import LOAD_PLUGINS_ENV, PluginManager
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.train import Trainer

#: the default tolerance of :func:`check_kv_cache` on logits, right for float32 models:
#: the cached path attends over other shapes than a full pass, so the sums are rounded in
#: another order and logits differ in their last digits (about 1e-6 on a tiny model)
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 0.0

#: the ``[model]`` table of :func:`tiny_model` and :func:`train_tiny` (keys may be overridden)
TINY_MODEL: dict[str, Any] = {
    "n_layers": 2,
    "d_model": 32,
    "n_heads": 4,
    "d_ff": 64,
    "dropout": 0.0,
    "context_length": 32,
}
#: the corpus :func:`train_tiny` writes and trains on, unless ``[data]`` names another one
TINY_TEXT = "the quick brown fox jumps over the lazy dog. " * 400

#: what error messages call the experiments built here
SOURCE = "slmkit.testing"


def plugin_name(plugin: object) -> str:
    """The name an inline plugin gets: its module's ``__name__`` (else its class's name)."""
    return str(getattr(plugin, "__name__", type(plugin).__name__))


# -- loading a plugin ----------------------------------------------------------------------


@attrs.define(frozen=True)
class RegisteredComponent:
    """One component a plugin registered: what ``register(name, factory, options=...)`` got."""

    kind: str
    name: str
    factory: Any
    options: type


@attrs.define(frozen=True)
class Registration:
    """What loading a plugin gave: the fields of ``slmkit plugins --json``, and its factories."""

    name: str
    #: why the plugin is broken (import, registration or an unknown hook), else None
    error: str | None
    #: the hooks it implements, sorted
    hooks: list[str]
    #: ``{kind: [component names]}``, the kinds named as in ``slmkit plugins``
    provides: dict[str, list[str]]
    components: list[RegisteredComponent]

    def component(self, kind: str, name: str) -> RegisteredComponent:
        """The registered component ``name`` of ``kind``; KeyError naming what there is."""
        for component in self.components:
            if (component.kind, component.name) == (kind, name):
                return component
        raise KeyError(f"plugin {self.name!r} registered no {kind} {name!r}: {self.provides}")


def load_plugin(
    plugin: object, name: str | None = None, *, version: str | None = None
) -> Registration:
    """Load ``plugin`` the way slmkit loads an installed one, with no other plugin around.

    Nothing is raised for a broken plugin: its ``error`` says what failed, as
    ``slmkit plugins`` would show it.
    """
    manager = PluginManager(default_plugins=(), entry_points=False)
    info = manager.add(plugin, name or plugin_name(plugin), version=version)
    components = [
        RegisteredComponent(c.kind, c.name, c.factory, c.options)
        for c in manager.registry.components()
        if c.plugin == info.name
    ]
    return Registration(info.name, info.error, info.hooks, info.provides, components)


def _manager(plugins: Iterable[object]) -> tuple[PluginManager, list[str]]:
    """The built-ins plus ``plugins`` (inline objects, installed names); the names to enable."""
    plugins = list(plugins)
    installed = [p for p in plugins if isinstance(p, str)]
    # entry points only when asked for, and only those: other installed plugins stay out
    manager = PluginManager(
        entry_points=bool(installed), environ={LOAD_PLUGINS_ENV: ",".join(installed)}
    ).load()
    enable = list(installed)
    for plugin in plugins:
        if isinstance(plugin, str):
            continue
        version = getattr(plugin, "__version__", None)
        info = manager.add(plugin, plugin_name(plugin), version=version)
        if info.error is not None:
            raise PluginError(f"plugin {info.name!r} is broken: {info.error}")
        enable.append(info.name)
    return manager, enable


# -- a tiny model --------------------------------------------------------------------------


@attrs.define(frozen=True)
class _Vocabulary:
    """All that building a model reads of a tokenizer."""

    vocab_size: int
    pad_id: int | None = None


def tiny_model(
    block: str = "gpt",
    plugins: Iterable[object] = (),
    *,
    model: Mapping[str, Any] | None = None,
    vocab_size: int = 64,
    seed: int = 0,
) -> LanguageModel:
    """A small language model whose blocks are the component ``block``, in eval mode.

    ``model`` holds keys of the ``[model]`` table over :data:`TINY_MODEL`: sizes and the
    block's own options, structured and validated as in an experiment (a bad value raises
    ``slmkit.ConfigError`` naming ``model.<key>``). Like a run, it seeds torch's global RNG
    with ``seed`` right before building, so the weights are the same every time.
    """
    manager, enable = _manager(plugins)
    data = {"plugins": {"enable": enable}, "model": {**TINY_MODEL, **(model or {}), "block": block}}
    exp = experiment_from_dict(data, manager, source=SOURCE)
    torch.manual_seed(seed)
    return build_model(exp, cast(Tokenizer, _Vocabulary(vocab_size))).eval()


# -- a tiny run ----------------------------------------------------------------------------


@attrs.define
class TinyRun:
    """What :func:`train_tiny` trained."""

    run_dir: Path
    #: ``{step: train_loss}`` of every logged step (after a resume, a re-trained step's
    #: latest loss)
    losses: dict[int, float]
    #: the trained model, in eval mode
    model: LanguageModel
    #: the summary the run logged as ``run_end``
    summary: dict[str, Any]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The events of the run's ``log.jsonl`` (those called ``name``), in order."""
        events = read_events(self.run_dir / "log.jsonl")
        return [e for e in events if name is None or e["event"] == name]


def tiny_experiment(
    corpus: Path, steps: int, seed: int, changes: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The experiment of :func:`train_tiny`, with ``changes`` merged in table by table.

    A ``[data]`` table that names a ``corpus`` replaces the default one (the file
    ``corpus``); ``[plugins] enable`` lists are joined; arrays of tables are replaced.
    """
    tables: dict[str, Any] = {
        "experiment": {"name": "tiny", "seed": seed},
        "plugins": {"enable": []},
        "data": {"corpus": "file", "path": str(corpus), "val_fraction": 0.1},
        "model": dict(TINY_MODEL),
        "training": {
            "batch_size": 4, "max_steps": steps, "eval_every": 0, "eval_batches": 2,
            "checkpoint_every": 0, "log_every": 1, "device": "cpu",
        },
        "sampling": {"every": 0, "max_new_tokens": 8},
    }  # fmt: skip
    for table, values in (changes or {}).items():
        if table == "data" and "corpus" in values:
            tables["data"] = dict(values)
        elif table == "plugins":
            enable = [*tables["plugins"]["enable"], *values.get("enable", [])]
            tables["plugins"] = {**tables["plugins"], **values, "enable": enable}
        elif isinstance(values, Mapping) and isinstance(tables.get(table), dict):
            tables[table] = {**tables[table], **values}
        else:
            tables[table] = values
    return tables


def train_tiny(
    plugins: Iterable[object] = (),
    *,
    steps: int = 4,
    experiment: Mapping[str, Any] | None = None,
    folder: str | Path | None = None,
    seed: int = 0,
    resume: str | Path | None = None,
) -> TinyRun:
    """Train a tiny model for ``steps`` steps with ``plugins`` taking part, on the CPU.

    The run logs every step, evaluates and checkpoints at the last one, and samples
    nothing before it; ``experiment`` changes any table (see :func:`tiny_experiment`),
    e.g. ``{"training": {"eval_every": 2}, "forward_hooks": [{"name": "mine"}]}``. The
    corpus (:data:`TINY_TEXT`) and the run folder go into ``folder`` (a pytest
    ``tmp_path``; by default a new temporary folder that is left for you to inspect).
    ``resume`` continues a run folder or checkpoint, as ``slmkit run --resume`` does.
    Errors are raised as the kernel raises them (``slmkit.ConfigError``,
    ``slmkit.RunError``...).
    """
    where = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="slmkit-tiny-"))
    corpus = where / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    manager, enable = _manager(plugins)
    data = tiny_experiment(corpus, steps, seed, experiment)
    data["plugins"]["enable"] = [*enable, *data["plugins"]["enable"]]
    exp = experiment_from_dict(data, manager, source=SOURCE)
    trainer = Trainer(
        exp, manager, SOURCE, resume=resume, runs_dir=where / "runs", console=Console(quiet=True)
    )
    summary = trainer.run()
    run_dir = Path(summary["run_dir"])
    events = read_events(run_dir / "log.jsonl")
    losses = {e["step"]: e["train_loss"] for e in events if e["event"] == "train_step"}
    return TinyRun(run_dir, losses, trainer.model.eval(), summary)


# -- the KV cache ----------------------------------------------------------------------------


def cache_schedules(length: int) -> list[list[int]]:
    """How :func:`check_kv_cache` feeds ``length`` tokens by default (chunk sizes).

    Token by token; half as a prompt, then one token at a time; and chunks of several
    tokens after a non-empty cache (the queries are then the last keys, which only a
    correct causal mask handles).
    """
    prefill = max(1, length // 2)
    sizes = itertools.cycle((5, 3, 1, 4, 1, 6))
    chunks: list[int] = []
    while sum(chunks) < length:
        chunks.append(min(next(sizes), length - sum(chunks)))
    return [[1] * length, [prefill] + [1] * (length - prefill), chunks]


def _describe(chunks: Sequence[int]) -> str:
    shown = ", ".join(map(str, chunks[:8])) + (", ..." if len(chunks) > 8 else "")
    return f"chunks [{shown}]"


def check_kv_cache(
    model: LanguageModel,
    *,
    chunks: Sequence[int] | None = None,
    batch: int = 2,
    seed: int = 0,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> float:
    """Check that generating with the KV cache gives the logits of a full forward pass.

    Random tokens (drawn with ``seed``, ``batch`` rows) are fed through one
    :class:`slmkit.KVCache` per layer in chunks of the given sizes (default: the
    :func:`cache_schedules` of a whole context window, one after another on the same
    caches, reset in between as generation resets them). The logits of each chunk must
    match those of one forward pass over all the tokens within ``atol + rtol * |logit|``,
    compared in float32, and every layer's cache must then hold all the tokens. Returns
    the largest difference seen; raises ``AssertionError`` naming the chunks, the first
    position that differs and by how much.

    Not exact equality: the cached path attends over other shapes than a full pass, so
    its sums are rounded in another order (:data:`DEFAULT_ATOL` suits float32 models; give
    a larger ``atol`` for bfloat16 or float16 weights).
    """
    context = model.dims.context_length
    schedules = [list(chunks)] if chunks is not None else cache_schedules(context)
    for schedule in schedules:
        if not schedule or min(schedule) < 1 or sum(schedule) > context:
            raise ValueError(
                f"chunks must be positive sizes adding up to at most the context length "
                f"({context}), got {list(schedule)}"
            )
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    length = max(sum(s) for s in schedules)
    tokens = torch.randint(0, model.dims.vocab_size, (batch, length), generator=generator)
    tokens = tokens.to(device)
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        with torch.no_grad():
            caches = [KVCache(context) for _ in model.blocks]
            for schedule in schedules:
                for cache in caches:
                    cache.reset()
                worst = max(worst, _check_schedule(model, tokens, schedule, caches, atol, rtol))
    finally:
        model.train(was_training)
    return worst


def _check_schedule(
    model: LanguageModel,
    tokens: torch.Tensor,
    schedule: list[int],
    caches: list[KVCache],
    atol: float,
    rtol: float,
) -> float:
    """Feed ``tokens[:, :sum(schedule)]`` chunk by chunk; compare with one full pass."""
    length = sum(schedule)
    full = model(tokens[:, :length])[0].float()
    cached, start = [], 0
    for size in schedule:
        cached.append(model(tokens[:, start : start + size], caches=caches)[0].float())
        start += size
    for layer, cache in enumerate(caches):
        if cache.length != length:
            raise AssertionError(
                f"KV cache check, {_describe(schedule)}: layer {layer}'s cache holds "
                f"{cache.length} time steps after {length} tokens; a block must append "
                "each call's keys and values to ctx.cache (the model reads the next "
                "position from layer 0's cache)"
            )
    diff = (torch.cat(cached, dim=1) - full).abs()
    bad = ~(diff <= atol + rtol * full.abs())  # NaN counts as a difference
    if bad.any():
        position = int(bad.any(dim=2).any(dim=0).nonzero()[0])
        raise AssertionError(
            f"KV cache check, {_describe(schedule)}: the logits at position {position} "
            f"differ from a full forward pass by {diff[:, position].max().item():.3g} "
            f"(atol {atol:g}, rtol {rtol:g}; largest difference {diff.max().item():.3g})"
        )
    return float(diff.max())


def check_decode(model: LanguageModel, *, batch: int = 2, seed: int = 0) -> None:
    """Check that the blocks' ``decoder`` steps (fast sampling) compute what ``forward`` does.

    Random tokens (``seed``, ``batch`` rows) fill a context window one at a time after the
    first, through ``forward`` on one set of caches and :class:`slmkit.decode.DecodeStep` on
    another: the logits must be equal, bit for bit (else ``AssertionError``, naming where).
    """
    context = model.dims.context_length
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.dims.vocab_size, (batch, context), generator=generator)
    tokens = tokens.to(next(model.parameters()).device)
    step = model.decode_step()
    plain, fast = ([KVCache(context) for _ in model.blocks] for _ in range(2))
    was_training = model.training
    try:
        with torch.inference_mode():
            for caches in (plain, fast):  # the first token, as a prompt
                model.eval()(tokens[:, :1], caches=caches)
            for t in range(1, context):
                logits = model(tokens[:, t : t + 1], caches=plain)[0][:, -1]
                diff = (step(tokens[:, t], fast, t) - logits).abs().max().item()
                if not diff == 0:  # NaN too
                    raise AssertionError(
                        f"decode check: logits at position {t} differ from forward's by {diff:.3g}"
                    )
    finally:
        model.train(was_training)
