"""Shared fixtures: tiny experiments and fresh plugin managers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from slmkit.plugins import PluginManager

ROOT = Path(__file__).resolve().parent.parent

#: a model small enough that a step takes milliseconds
TINY: dict[str, Any] = {
    "experiment": {"name": "tiny", "seed": 7},
    "model": {
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 2,
        "d_ff": 64,
        "dropout": 0.1,
        "context_length": 32,
    },
    "optimizer": {"learning_rate": 1e-3},
    "training": {
        "batch_size": 4,
        "max_steps": 6,
        "eval_every": 3,
        "eval_batches": 2,
        "checkpoint_every": 3,
        "log_every": 1,
        "device": "cpu",
    },
    "sampling": {"every": 3, "max_new_tokens": 8},
}


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with the tables of ``changes`` merged in."""
    out = json.loads(json.dumps(base))
    for table, values in changes.items():
        if isinstance(values, dict) and isinstance(out.get(table), dict):
            out[table].update(values)
        else:
            out[table] = values
    return out


@pytest.fixture
def write_experiment(tmp_path: Path):
    """``write_experiment(changes, name=...)`` writes a tiny experiment and returns its path."""

    def write(changes: dict[str, Any] | None = None, name: str = "tiny.toml") -> Path:
        path = tmp_path / name
        path.write_text(tomli_w.dumps(merge(TINY, changes or {})), encoding="utf-8")
        return path

    return write


@pytest.fixture
def manager() -> PluginManager:
    """A fresh manager with the built-ins and no entry points."""
    return PluginManager(entry_points=False).load()


@pytest.fixture
def cli():
    """``cli(*args, cwd=..., env=...)`` runs ``python -m slmkit ARGS`` in a subprocess."""
    return run_cli


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``python -m slmkit ARGS`` in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "slmkit", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
