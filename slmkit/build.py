"""Turning a resolved experiment into live components: tokenizer, corpus, model, optimizer.

Every factory is looked up in the plugin registry among the run's participating plugins;
nothing here knows a concrete component.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from slmkit.components import ModelDims, Schedule, Tokenizer
from slmkit.errors import ConfigError, DataError
from slmkit.experiment import Experiment
from slmkit.model import LanguageModel
from slmkit.options import OptionValueError
from slmkit.plugins import PluginManager


def _factory(manager: PluginManager, exp: Experiment, kind: str, name: str, table: str) -> Any:
    """The component's factory; an option error it raises names the file and ``table``."""
    factory = manager.component(kind, name, exp.participants).factory

    def build(*args: Any) -> Any:
        try:
            return factory(*args)
        except OptionValueError as exc:
            raise ConfigError(exp.source, f"{table}.{exc.key}", exc.message) from None

    return build


def build_tokenizer(exp: Experiment, manager: PluginManager) -> Tokenizer:
    """A fresh (untrained) tokenizer."""
    make = _factory(manager, exp, "tokenizer", exp.tokenizer.name, "tokenizer")
    return make(exp.tokenizer.options)


def read_experiment_corpus(exp: Experiment, manager: PluginManager) -> str:
    """The corpus text; corpus problems become errors naming the file and the data key."""
    from slmkit.data import read_corpus

    try:
        corpus = _factory(manager, exp, "corpus", exp.data.corpus, "data")(exp.data.options)
        return read_corpus(corpus)
    except OptionValueError as exc:  # raised while reading, by texts()
        raise ConfigError(exp.source, f"data.{exc.key}", exc.message) from None
    except DataError as exc:
        raise ConfigError(exp.source, "data", str(exc)) from None
    except OSError as exc:
        raise ConfigError(exp.source, "data", f"cannot read the corpus: {exc}") from None


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


def build_model(exp: Experiment, manager: PluginManager, tokenizer: Tokenizer) -> LanguageModel:
    """The model, initialised from the current torch RNG state (seed before calling)."""
    dims = model_dims(exp, tokenizer.vocab_size)
    make = _factory(manager, exp, "block", exp.model.block, "model")
    block = manager.component("block", exp.model.block, exp.participants)
    model = LanguageModel(
        dims,
        lambda layer: make(dims, exp.model.options, layer),
        pad_id=tokenizer.pad_id,
        learned_positions=getattr(block.factory, "learned_positions", True),
    )
    if exp.model.tie_embeddings:
        model.tie_embeddings()
    return model


def build_optimizer(
    exp: Experiment, manager: PluginManager, model: LanguageModel
) -> torch.optim.Optimizer:
    """The optimizer over the model's decay / no-decay groups."""
    make = _factory(manager, exp, "optimizer", exp.optimizer.name, "optimizer")
    return make(model.param_groups(exp.optimizer.learning_rate), exp.optimizer.options)


def build_schedule(exp: Experiment, manager: PluginManager) -> Schedule:
    """The learning-rate schedule for ``training.max_steps`` steps."""
    make = _factory(manager, exp, "schedule", exp.schedule.name, "schedule")
    return make(exp.schedule.options, exp.training.max_steps)


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


@attrs.define
class TrainedModel:
    """A model rebuilt from a checkpoint, with what it was trained with."""

    experiment: Experiment
    tokenizer: Tokenizer
    model: LanguageModel
    device: torch.device
    step: int
    path: Path
    #: ranks of the run that wrote it: its validation batches held batch_size x this windows
    world_size: int = 1


def load_trained(path: str | Path, manager: PluginManager, device: str = "auto") -> TrainedModel:
    """Rebuild the model of a checkpoint (or a run folder's latest) in eval mode."""
    from slmkit import checkpoint
    from slmkit.experiment import experiment_from_dict

    ckpt_path = checkpoint.resolve(path)
    payload = checkpoint.load(ckpt_path)
    exp = experiment_from_dict(payload["experiment"], manager, source=f"{ckpt_path} (experiment)")
    tokenizer = build_tokenizer(exp, manager)
    tokenizer.load_state_dict(payload["tokenizer"]["state"])
    target = resolve_device(device, str(ckpt_path))
    with torch.device("meta"):  # no initialisation work: the weights come from the file
        model = build_model(exp, manager, tokenizer)
    model = model.to_empty(device=target)
    if exp.model.tie_embeddings:  # to_empty gives each module its own new tensor
        model.tie_embeddings()
    model.load_state_dict(payload["model"])
    model.eval()
    world_size = int(payload.get("world_size", 1))
    return TrainedModel(exp, tokenizer, model, target, int(payload["step"]), ckpt_path, world_size)
