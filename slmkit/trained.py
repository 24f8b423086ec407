"""A trained model rebuilt from a checkpoint: what ``slmkit sample`` and ``slmkit eval`` use."""

from __future__ import annotations

from pathlib import Path

import attrs
import torch

from slmkit import checkpoint
from slmkit.build import build_model, build_tokenizer, resolve_device
from slmkit.components import Tokenizer
from slmkit.config.resolve import experiment_from_dict
from slmkit.config.schema import Experiment
from slmkit.errors import CheckpointError
from slmkit.model import LanguageModel
from slmkit.plugins import PluginManager


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
    #: the precision it trained in ("fp32", "bf16", "fp16"; None: not kept by older files)
    precision: str | None = None


def load_trained(path: str | Path, manager: PluginManager, device: str = "auto") -> TrainedModel:
    """Rebuild the model of a checkpoint (or a run folder's latest) in eval mode."""
    ckpt_path = checkpoint.resolve(path)
    payload = checkpoint.load(ckpt_path)
    exp = experiment_from_dict(payload["experiment"], manager, source=f"{ckpt_path} (experiment)")
    tokenizer = build_tokenizer(exp)
    tokenizer.load_state_dict(payload["tokenizer"]["state"])
    target = resolve_device(device, str(ckpt_path))
    with torch.device("meta"):  # no initialisation work: the weights come from the file
        model = build_model(exp, tokenizer)
    model = model.to_empty(device=target)
    if exp.model.tie_embeddings:  # to_empty gives each module its own new tensor
        model.tie_embeddings()
    model.load_state_dict(payload["model"])
    bad = model.nonfinite_parameters()
    if bad:  # what it would compute is NaN: refuse rather than report nan
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(f"{ckpt_path}: its weights are not finite ({bad[0]}{more})")
    model.eval()
    world_size, precision = int(payload.get("world_size", 1)), payload.get("precision")
    step = int(payload["step"])
    return TrainedModel(exp, tokenizer, model, target, step, ckpt_path, world_size, precision)
