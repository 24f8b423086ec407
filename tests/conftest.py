"""Shared fixtures: tiny experiments and fresh plugin managers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch

import slmkit
from slmkit import checkpoint
from slmkit.config.resolve import load_experiment
from slmkit.plugins import PluginManager
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.train import Trainer

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
        # the default "auto" is bf16 on CPUs with native bf16: pinned so that the tests'
        # exact numbers do not depend on the CPU running them
        "precision": "fp32",
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


@pytest.fixture(autouse=True, scope="session")
def trackio_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trackio's store for the whole session: ``TRACKIO_DIR``, which trackio reads once, when
    it is first imported (also by the runs tests start), so no test writes to the home folder."""
    assert "trackio" not in sys.modules, "trackio was imported before its store was set"
    store = tmp_path_factory.mktemp("trackio")
    os.environ["TRACKIO_DIR"] = str(store)
    return store


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


def run_main(*args: str) -> tuple[int, str, str]:
    """``slmkit ARGS`` in this process (stdout is no terminal): exit code, stdout, stderr."""
    from slmkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


# -- tiny runs -------------------------------------------------------------------------------


def train(path: Path, runs: Path, manager: PluginManager, overrides=(), resume=None) -> Path:
    """Train the experiment at ``path`` quietly into ``runs``; the run folder."""
    exp = load_experiment(path, manager, overrides)
    trainer = Trainer(exp, manager, str(path), runs_dir=runs, resume=resume,
                      console=Console(quiet=True))  # fmt: skip
    return Path(trainer.run()["run_dir"])


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, train_loss)`` of every train_step event."""
    return [(e["step"], e["train_loss"]) for e in events(run_dir, "train_step")]


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    """The run's logged events called ``name``, in order."""
    return [e for e in read_events(run_dir / "log.jsonl") if e["event"] == name]


def assert_same_parameters(a: Path, b: Path) -> None:
    """The newest checkpoints of two runs (or two checkpoint files) hold equal weights."""
    pa, pb = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


class Interrupt:
    """A plugin that fails the run right after the checkpoint of step ``at`` (None: never)."""

    def __init__(self) -> None:
        self.at: int | None = None

    @slmkit.hookimpl
    def on_checkpoint(self, step: int) -> None:
        if step == self.at:
            raise RuntimeError("interrupted")


# -- installing plugin distributions ---------------------------------------------------------


def plugin_env(*pythonpath: Path) -> dict[str, str]:
    """The environment of a child process that sees the given folders as installed."""
    env = dict(os.environ)
    env.pop("SLMKIT_LOAD_PLUGINS", None)  # load every entry point, whatever the caller set
    env["PYTHONPATH"] = os.pathsep.join(
        [str(p) for p in pythonpath] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in the plugins' folders
    return env


def install_distributions(target: Path, folders: dict[str, Path], what: str) -> None:
    """Build and install ``{distribution: folder}`` into ``target`` with uv, else pip.

    Skips the test when neither is there; fails it, with the installer's output, when the
    install fails.
    """
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` exports UV
    sources = [str(folder) for folder in folders.values()]
    if uv:
        # --refresh-package: rebuild from the current sources, not a cached wheel
        refresh = [arg for dist in folders for arg in ("--refresh-package", dist)]
        command = [uv, "pip", "install", "--no-deps", "--python", sys.executable,
                   "--target", str(target), *refresh, *sources]  # fmt: skip
    elif subprocess.run([sys.executable, "-m", "pip", "--version"],
                        capture_output=True, check=False).returncode == 0:  # fmt: skip
        command = [sys.executable, "-m", "pip", "install", "--no-deps",
                   "--target", str(target), *sources]  # fmt: skip
    else:
        pytest.skip(f"neither uv nor pip is available to install {what}")
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(
            f"installing {what} failed (the build needs hatchling from PyPI or uv's cache):"
            f"\n$ {' '.join(command)}\n{done.stdout}\n{done.stderr}"
        )


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded for a module (``pytestmark = pytest.mark.usefixtures(...)``):
    its ops are tiny, and on a busy 2-core machine the intra-op thread pool makes them up to
    100x slower (threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
