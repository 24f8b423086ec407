"""Turning a resolved experiment into live parts: tokenizer, data, model, optimizer, hooks.

Every section that picks a component carries the registry entry resolution found
(``section.component``), so nothing here looks a component up again or knows a concrete
one. An option error a factory raises becomes one line naming the file and the key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import torch

from slmkit import checkpoint
from slmkit.components import Corpus, ModelDims, Schedule, Tokenizer
from slmkit.config.schema import Experiment
from slmkit.data import (
    BatchStream,
    Splits,
    prepare_splits,
    rank_share,
    read_corpus,
    unknown_warning,
    validation_batches,
)
from slmkit.errors import ConfigError, DataError
from slmkit.floor import Floor, floor_metrics, has_floor
from slmkit.hooks import EnabledHook, ForwardHooks, UpdateHooks, select_points
from slmkit.model import LanguageModel
from slmkit.options import OptionValueError
from slmkit.precision import Precision
from slmkit.probes import Probes, build_probes
from slmkit.trackers import Trackers


def construct(source: str, section: Any, table: str, *args: Any) -> Any:
    """Call the factory of ``section``'s component with its options and ``args``.

    An :class:`OptionValueError` it raises names ``source`` (the file) and ``table.<key>``.
    """
    assert section.component is not None, "build only resolved experiments"
    try:
        return section.component.factory(section.options, *args)
    except OptionValueError as exc:
        raise ConfigError(source, f"{table}.{exc.key}", exc.message) from None


def build_tokenizer(exp: Experiment) -> Tokenizer:
    """A fresh (untrained) tokenizer."""
    tokenizer: Tokenizer = construct(exp.source, exp.tokenizer, "tokenizer")
    return tokenizer


def model_dims(exp: Experiment, vocab_size: int) -> ModelDims:
    """The model-wide sizes from ``[model]`` and the tokenizer's vocabulary."""
    m = exp.model
    return ModelDims(
        n_layers=m.n_layers,
        d_model=m.d_model,
        n_heads=m.n_heads,
        d_ff=m.d_ff,
        dropout=m.dropout,
        context_length=m.context_length,
        vocab_size=vocab_size,
    )


def build_model(exp: Experiment, tokenizer: Tokenizer) -> LanguageModel:
    """The model, initialised from the current torch RNG state (seed before calling)."""
    dims = model_dims(exp, tokenizer.vocab_size)
    assert exp.model.component is not None
    model = LanguageModel(
        dims,
        lambda layer: construct(exp.source, exp.model, "model", dims, layer),
        pad_id=tokenizer.pad_id,
        learned_positions=getattr(exp.model.component.factory, "learned_positions", True),
        final_norm=exp.model.final_norm,
        init=exp.model.init,
    )
    if exp.model.tie_embeddings:
        model.tie_embeddings()
    return model


def build_optimizer(exp: Experiment, model: LanguageModel) -> torch.optim.Optimizer:
    """The optimizer over the model's decay / no-decay groups."""
    groups = model.param_groups(exp.optimizer.learning_rate)
    optimizer: torch.optim.Optimizer = construct(exp.source, exp.optimizer, "optimizer", groups)
    return optimizer


def build_schedule(exp: Experiment) -> Schedule:
    """The learning-rate schedule for ``training.max_steps`` steps."""
    schedule: Schedule = construct(exp.source, exp.schedule, "schedule", exp.training.max_steps)
    return schedule


# -- data ---------------------------------------------------------------------------------


@attrs.define
class Data:
    """The encoded corpus of a run, and how it is served to the model."""

    splits: Splits
    #: this rank's endless training batches
    stream: BatchStream
    #: the fixed validation set: ``eval_batches`` global batches
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    #: this rank's part of each validation batch
    val_share: list[tuple[torch.Tensor, torch.Tensor]]
    #: the best loss any model can reach on the validation windows (corpora that know it)
    floor: Floor | None = None

    def floor_metrics(self, val_loss: float) -> dict[str, float]:
        """``val_floor`` and ``val_excess`` (nats per character); nothing without a floor."""
        return floor_metrics(self.floor, val_loss, self.splits.chars_per_token)

    def describe(self, corpus: str) -> dict[str, Any]:
        """What the run log records about the data (``corpus`` names the component)."""
        s = self.splits
        return {
            "corpus": {"name": corpus, "sha256": s.corpus_sha256, "chars": s.n_chars},
            "train_tokens": len(s.train),
            "val_tokens": len(s.val),
            "unknown_tokens": s.unknown_tokens,
        }

    def unknown_warning(self) -> str | None:
        """A warning when the tokenizer could not spell much of the corpus (``<UNK>``)."""
        return unknown_warning(self.splits)


def read_experiment_corpus(exp: Experiment) -> str:
    """The corpus text; corpus problems become errors naming the file and the data key."""
    return experiment_corpus(exp)[1]


def experiment_corpus(exp: Experiment) -> tuple[Corpus, str]:
    """The corpus component and its text; problems name the file and the data key."""
    try:
        corpus = construct(exp.source, exp.data, "data")
        return corpus, read_corpus(corpus)
    except OptionValueError as exc:  # raised while reading, by texts()
        raise ConfigError(exp.source, f"data.{exc.key}", exc.message) from None
    except DataError as exc:
        raise ConfigError(exp.source, "data", str(exc)) from None
    except OSError as exc:
        raise ConfigError(exp.source, "data", f"cannot read the corpus: {exc}") from None


def build_data(
    exp: Experiment,
    tokenizer: Tokenizer,
    *,
    train_tokenizer: bool = True,
    rank: int = 0,
    world_size: int = 1,
    floor: Floor | None = None,
) -> Data:
    """Read the corpus, split it, train the tokenizer (unless told not to), batch it.

    A batch holds ``batch_size`` windows per rank, so the global batch (and the validation
    set) depends on ``world_size``; rank ``rank`` trains on its own slice of each. The
    corpus's floor is computed here (once per run) unless ``floor`` (the run folder's
    cached one, on resume) is given.
    """
    corpus, text = experiment_corpus(exp)
    t, context = exp.training, exp.model.context_length
    try:
        splits = prepare_splits(
            text, tokenizer, exp.data.val_fraction, context, train_tokenizer=train_tokenizer
        )
    except DataError as exc:
        raise ConfigError(exp.source, "data", str(exc)) from None
    stream = BatchStream(
        splits.train, context, t.batch_size, exp.experiment.seed, rank=rank, world_size=world_size
    )
    val_batches = validation_batches(splits.val, context, t.batch_size * world_size, t.eval_batches)
    _check_ranks_fit(exp, stream.n_windows, len(splits.val) // (context + 1), world_size)
    if floor is None:
        n_windows = sum(len(x) for x, _ in val_batches)
        floor = corpus_floor(exp, corpus, text[splits.val_start :], n_windows)
    return Data(splits, stream, val_batches, rank_share(val_batches, rank, world_size), floor)


def corpus_floor(exp: Experiment, corpus: Corpus, val_text: str, n_windows: int) -> Floor | None:
    """The corpus's floor over the validation windows; None for a corpus without one.

    ``data.require_floor = true`` makes a corpus without a floor an error.
    """
    if not has_floor(corpus):
        if exp.data.require_floor:
            raise ConfigError(
                exp.source, "data.require_floor",
                f"the {exp.data.corpus!r} corpus has no floor (its source is unknown); "
                "use a synthetic corpus (markov, hmm, induction, regular) or remove the key",
            )  # fmt: skip
        return None
    try:
        return corpus.floor(val_text, exp.model.context_length, n_windows)  # type: ignore[attr-defined]
    except DataError as exc:
        raise ConfigError(exp.source, "data", f"cannot compute the floor: {exc}") from None


def _check_ranks_fit(exp: Experiment, n_train: int, n_val: int, ranks: int) -> None:
    """Under torchrun: a global batch of distinct windows, validation for every rank."""
    if ranks == 1:
        return
    batch, window = exp.training.batch_size, exp.model.context_length + 1
    if n_train < batch * ranks:
        raise ConfigError(
            exp.source, "training.batch_size",
            f"{batch} windows per rank x {ranks} ranks = {batch * ranks} "
            f"windows per global batch, but the training split has only {n_train} windows "
            f"of {window} tokens; use fewer ranks, a smaller batch_size or a larger corpus",
        )  # fmt: skip
    if n_val < ranks:
        raise ConfigError(
            exp.source, "data.val_fraction",
            f"the validation split has {n_val} window(s) of {window} tokens, fewer than "
            f"the {ranks} ranks that share it; use fewer ranks, a larger val_fraction or "
            "a larger corpus",
        )  # fmt: skip


# -- hooks ---------------------------------------------------------------------------------


def _enabled(exp: Experiment, kind: str, table: str) -> Iterator[tuple[int, Any, EnabledHook]]:
    """``(index, section, hook)`` of each enabled table of an array, built by its factory."""
    for i, section in enumerate(exp.arrays.get(table, ())):
        if not section.enabled:
            continue  # left out entirely: nothing is built or attached
        assert section.component is not None
        hook = construct(exp.source, section, f"{table}.{i}")
        every = getattr(section, "every", 1)
        yield i, section, EnabledHook(kind, section.name, section.component.plugin, hook, every)


def build_forward_hooks(exp: Experiment, model: LanguageModel) -> ForwardHooks | None:
    """The enabled ``[[forward_hooks]]``, each with the hook points its globs select."""
    names = list(model.hook_points)
    hooks = []
    for i, section, entry in _enabled(exp, "forward_hook", "forward_hooks"):
        patterns = section.points or list(entry.hook.default_points)
        for pattern, matched in select_points(names, patterns).items():
            if not matched:
                raise ConfigError(
                    exp.source, f"forward_hooks.{i}.points",
                    f"{pattern!r} matches no hook point of this model (docs/hooks.md "
                    f"lists them; e.g. {', '.join(names[:3])}, ...)",
                )  # fmt: skip
            entry.points += [m for m in matched if m not in entry.points]
        hooks.append(entry)
    return ForwardHooks(hooks, model.hook_points) if hooks else None


def build_update_hooks(exp: Experiment, model: LanguageModel) -> UpdateHooks | None:
    """The enabled ``[[update_hooks]]``, in order, over the trainable parameters."""
    hooks = [entry for _, _, entry in _enabled(exp, "update_hook", "update_hooks")]
    parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return UpdateHooks(hooks, parameters) if hooks else None


# -- everything a run builds before it trains ---------------------------------------------


@attrs.define
class Parts:
    """What a run of an experiment trains with, built and checked."""

    tokenizer: Tokenizer
    data: Data
    model: LanguageModel
    precision: Precision
    forward_hooks: ForwardHooks | None
    update_hooks: UpdateHooks | None
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    probes: Probes | None = None
    #: the enabled [[trackers]], opened with the run's log (rank 0's: the only one)
    trackers: Trackers = attrs.Factory(Trackers)


def build_parts(
    exp: Experiment,
    device: torch.device,
    *,
    tokenizer_state: dict[str, Any] | None = None,
    floor: Floor | None = None,
    rank: int = 0,
    world_size: int = 1,
    meta: bool = False,
    started_precision: str | None = None,
) -> Parts:
    """Every part a run of ``exp`` on ``device`` needs; every check of the input happens here.

    ``tokenizer_state`` restores a saved tokenizer instead of training one (resume), and
    ``floor`` is the corpus's floor the run folder keeps (resume: not computed again).
    ``meta`` builds the model on the meta device (sizes, no weights): what ``slmkit
    validate`` does, so that it refuses exactly what a run would refuse before training.
    ``started_precision`` is the resumed checkpoint's: the run keeps it
    (:meth:`Precision.of`).
    """
    tokenizer = build_tokenizer(exp)
    if tokenizer_state is not None:
        tokenizer.load_state_dict(tokenizer_state)
    data = build_data(
        exp,
        tokenizer,
        train_tokenizer=tokenizer_state is None,
        rank=rank,
        world_size=world_size,
        floor=floor,
    )
    # Every rank seeds alike, so the models start identical and the RNG streams stay in
    # step: an update hook that draws noise (grad_noise) draws the same on every rank.
    checkpoint.seed_all(exp.experiment.seed)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = build_model(exp, tokenizer)
    if not meta:
        model = model.to(device)
    precision = Precision.of(exp, device, started_precision)
    return Parts(
        tokenizer=tokenizer,
        data=data,
        model=model,
        precision=precision,
        forward_hooks=build_forward_hooks(exp, model),
        update_hooks=build_update_hooks(exp, model),
        optimizer=build_optimizer(exp, model),
        schedule=build_schedule(exp),
        probes=build_probes(
            exp, _enabled(exp, "probe", "probes"), model, tokenizer, data.splits.val
        ),
        trackers=Trackers([entry for *_, entry in _enabled(exp, "tracker", "trackers")]),
    )


# -- devices and saved models --------------------------------------------------------------


def resolve_device(name: str, source: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unavailable choice is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available[name]:
        raise ConfigError(source, "training.device", f"{name!r} is not available on this machine")
    return torch.device(name)
