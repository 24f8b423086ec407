"""A tiny model trained on ``markov`` approaches the floor and never beats it by more than noise."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import events, train

from slmkit.plugins import PluginManager

#: an order-1 chain over 4 characters, and a model that learns it in 200 steps
MARKOV_RUN = {
    "experiment": {"name": "floor-train", "seed": 1},
    "data": {"corpus": "markov", "size": 60_000, "alphabet": 4, "order": 1, "seed": 2,
             "val_fraction": 0.1},
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0,
              "context_length": 32},
    "optimizer": {"learning_rate": 0.01},
    "training": {"batch_size": 16, "max_steps": 200, "eval_every": 20, "eval_batches": 8,
                 "checkpoint_every": 0, "log_every": 50},
    "sampling": {"every": 0},
}  # fmt: skip


@pytest.mark.slow
def test_a_tiny_model_comes_within_0_05_of_the_floor_and_never_below_it(
    write_experiment, tmp_path: Path, manager: PluginManager
) -> None:
    run_dir = train(write_experiment(MARKOV_RUN), tmp_path / "runs", manager)
    excess = [e["val_excess"] for e in events(run_dir, "eval")]
    assert len(excess) == 10  # every 20 steps
    assert excess[-1] < 0.05, excess
    assert min(excess) >= -0.01, excess
    assert excess[0] > excess[-1]  # it learned: the first evaluation is further away
