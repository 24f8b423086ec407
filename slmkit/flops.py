"""A run's compute budget: ``training.max_flops`` turned into ``training.max_steps``.

Training a model of ``N`` parameters on ``D`` tokens costs about ``C = 6 N D`` FLOPs (2 per
parameter and token forward, 4 backward; Kaplan et al. 2020). Here ``N`` is the model's
non-embedding parameters (:attr:`LanguageModel.n_non_embedding_params`), the ``N`` that
``slmkit scaling`` fits, so a budget and the compute-optimal allocation the fit reports
speak of the same ``C``. Given a budget, a run trains
``max_steps = floor(max_flops / (6 N x tokens per step))`` steps (at least 1), which makes
an isoFLOP sweep over model sizes one ``slmkit run --sweep`` command.

The steps are derived before anything is built, so the schedule, the resume checks and the
run folder's ``experiment.toml`` all see the derived ``max_steps``.
"""

from __future__ import annotations

import math
from typing import cast

import attrs
import torch

from slmkit.build import build_model
from slmkit.components import Tokenizer
from slmkit.config.schema import Experiment
from slmkit.errors import ConfigError


@attrs.define(frozen=True)
class _NoVocabulary:
    """A stand-in tokenizer: the non-embedding parameters do not depend on the vocabulary."""

    vocab_size: int = 1
    pad_id: int | None = None


@attrs.define(frozen=True)
class FlopsBudget:
    """How ``training.max_flops`` decided a run's length."""

    max_flops: float
    non_embedding_params: int
    #: training tokens per optimizer step, over all ranks
    tokens_per_step: int
    max_steps: int

    def describe(self) -> str:
        """One line for the console: the budget and the steps it buys."""
        return (
            f"training.max_flops = {self.max_flops:.4g}: {self.max_steps} steps of "
            f"{self.tokens_per_step:,} tokens for {self.non_embedding_params:,} non-embedding "
            "parameters (C = 6ND; this replaces training.max_steps)"
        )


def non_embedding_params(exp: Experiment) -> int:
    """The ``N`` of the experiment's model, counted on the meta device (no weights)."""
    with torch.device("meta"):
        model = build_model(exp, cast(Tokenizer, _NoVocabulary()))
    return model.n_non_embedding_params


def steps_for_flops(max_flops: float, n_params: int, tokens_per_step: int) -> int:
    """Optimizer steps a budget of ``max_flops`` pays for: ``floor(C / (6 N T))``, >= 1."""
    return max(1, math.floor(max_flops / (6 * n_params * tokens_per_step)))


def apply_max_flops(exp: Experiment, world_size: int = 1) -> tuple[Experiment, FlopsBudget | None]:
    """``exp`` with ``training.max_steps`` derived from ``training.max_flops`` (when set).

    ``world_size`` ranks each train ``batch_size x grad_accum_steps`` windows a step.
    Without a budget, ``exp`` comes back unchanged with no :class:`FlopsBudget`.
    """
    t = exp.training
    if not t.max_flops:
        return exp, None
    n_params = non_embedding_params(exp)
    if n_params == 0:
        raise ConfigError(
            exp.source, "training.max_flops", "the model has no non-embedding parameters to "
            "spend a budget on; use training.max_steps",
        )  # fmt: skip
    tokens_per_step = t.batch_size * t.grad_accum_steps * world_size * exp.model.context_length
    steps = steps_for_flops(t.max_flops, n_params, tokens_per_step)
    budget = FlopsBudget(t.max_flops, n_params, tokens_per_step, steps)
    derived = attrs.evolve(exp, training=attrs.evolve(t, max_steps=steps))
    return derived, budget
