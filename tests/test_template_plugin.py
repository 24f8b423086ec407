"""The template plugin ``plugins/slmkit-sgd-momentum``, installed the way a user would.

The distribution is built and installed (``uv pip install --no-deps --target``) into a
throw-away folder, never into the project's environment; the ``slmkit`` command then runs
in a subprocess with that folder on ``PYTHONPATH``, so its entry point is found exactly as
an installed plugin's would be. A hand-made broken distribution checks that one plugin
failing to import leaves slmkit and every other plugin working.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
from conftest import install_distributions, plugin_env

from slmkit.runlog import read_events

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "plugins" / "slmkit-sgd-momentum"
DIST = "slmkit-sgd-momentum"
VERSION = "0.1.0"
TIMEOUT = 300


# -- helpers -------------------------------------------------------------------------------


def slmkit(*args: str, pythonpath: tuple[Path, ...], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m slmkit ARGS`` (the ``slmkit`` command) in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "slmkit", *args],
        cwd=cwd,
        env=plugin_env(*pythonpath),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def tiny_experiment(optimizer: dict[str, Any], enable: list[str] | None) -> dict[str, Any]:
    """A run of a few seconds: 2 layers, d_model 32, context 16, batch 4, 5 steps."""
    exp: dict[str, Any] = {
        "experiment": {"name": "tiny", "seed": 0},
        "data": {"corpus": "python_docs"},
        "model": {
            "n_layers": 2,
            "d_model": 32,
            "n_heads": 2,
            "d_ff": 64,
            "dropout": 0.0,
            "context_length": 16,
        },
        "optimizer": optimizer,
        "training": {
            "batch_size": 4,
            "max_steps": 5,
            "eval_every": 0,
            "eval_batches": 2,
            "checkpoint_every": 0,
            "log_every": 1,
            "device": "cpu",
        },
        "sampling": {"every": 0, "max_new_tokens": 8},
    }
    if enable is not None:
        exp["plugins"] = {"enable": enable}
    return exp


SGD = {"name": "sgd_momentum", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True}
ADAMW = {"name": "adamw", "learning_rate": 1e-3}


def write(path: Path, experiment: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(experiment), encoding="utf-8")
    return path


def plugin_list(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)}


def single_run_log(runs_dir: Path) -> list[dict[str, Any]]:
    logs = list(runs_dir.glob("*/log.jsonl"))
    assert len(logs) == 1, logs
    return read_events(logs[0])


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template built and installed into a throw-away folder (once per module)."""
    target = tmp_path_factory.mktemp("site")
    install_distributions(target, {DIST: TEMPLATE}, str(TEMPLATE))
    assert (target / "slmkit_sgd_momentum" / "__init__.py").is_file()
    assert list(target.glob("slmkit_sgd_momentum-0.1.0.dist-info/entry_points.txt"))
    return target


BROKEN_DIST = "slmkit-broken-example"


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake installed distribution whose slmkit entry point raises ImportError."""
    site = tmp_path_factory.mktemp("broken_site")
    info = site / "slmkit_broken_example-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {BROKEN_DIST}\nVersion: 0.0.1\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        "[slmkit]\nbroken = slmkit_broken_example\n", encoding="utf-8"
    )
    (site / "slmkit_broken_example.py").write_text(
        'raise ImportError("slmkit_broken_example needs a library that is not installed")\n',
        encoding="utf-8",
    )
    return site


# -- the template, installed -----------------------------------------------------------------


def test_slmkit_plugins_lists_the_installed_template(installed: Path, tmp_path: Path) -> None:
    plugins = plugin_list(slmkit("plugins", "--json", pythonpath=(installed,), cwd=tmp_path))
    assert DIST in plugins, sorted(plugins)
    info = plugins[DIST]
    assert info["version"] == VERSION
    assert info["builtin"] is False
    assert info["source"] == "entry point slmkit:sgd_momentum"
    assert info["provides"] == {"optimizer": ["sgd_momentum"]}
    assert info["hooks"] == ["register_optimizers"]
    assert info["error"] is None
    assert all(p["error"] is None for p in plugins.values() if p["builtin"])


def test_template_own_tests_pass_against_the_installed_copy(installed: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TEMPLATE / "tests")],
        cwd=TEMPLATE,
        env=plugin_env(installed),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import slmkit_sgd_momentum as m; print(m.__file__)"],
        cwd=TEMPLATE,
        env=plugin_env(installed),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(installed)  # not the source tree


def test_tiny_run_with_the_template_optimizer(installed: Path, tmp_path: Path) -> None:
    experiment = write(tmp_path / "tiny.toml", tiny_experiment(SGD, enable=[DIST]))
    runs = tmp_path / "runs"
    done = slmkit(
        "run", str(experiment), "--runs-dir", str(runs), pythonpath=(installed,), cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    events = single_run_log(runs)
    start = next(e for e in events if e["event"] == "run_start")
    assert start["plugins"][DIST] == VERSION
    assert any(e["event"] == "run_end" for e in events)
    losses = [e["train_loss"] for e in events if e["event"] == "train_step"]
    assert len(losses) == 5
    assert all(loss == loss for loss in losses)  # no NaN
    # the optimizer's state went into the checkpoint, as plain tensors
    (ckpt,) = runs.glob("*/checkpoints/step_5.pt")
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = payload["optimizer"]["state"]
    assert state and all("momentum_buffer" in s for s in state.values())
    assert [g["nesterov"] for g in payload["optimizer"]["param_groups"]] == [True, True]


def test_template_component_without_plugins_enable_is_a_one_line_error(
    installed: Path, tmp_path: Path
) -> None:
    experiment = write(tmp_path / "tiny.toml", tiny_experiment(SGD, enable=None))
    runs = tmp_path / "runs"
    done = slmkit(
        "run", str(experiment), "--runs-dir", str(runs), pythonpath=(installed,), cwd=tmp_path
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("slmkit: error: ")
    assert "optimizer.name" in lines[0]
    assert f'add it to [plugins] enable = ["{DIST}"]' in lines[0]
    assert not runs.exists()  # nothing was started


# -- a broken plugin -------------------------------------------------------------------------


def test_broken_plugin_is_listed_with_its_error(broken_site: Path, tmp_path: Path) -> None:
    plugins = plugin_list(slmkit("plugins", "--json", pythonpath=(broken_site,), cwd=tmp_path))
    broken = plugins[BROKEN_DIST]
    assert broken["builtin"] is False
    assert broken["version"] == "0.0.1"
    assert broken["error"] is not None
    assert "ImportError" in broken["error"]
    assert "needs a library that is not installed" in broken["error"]
    builtins = [p for p in plugins.values() if p["builtin"]]
    assert builtins
    assert all(p["error"] is None and p["provides"] for p in builtins)


def test_broken_plugin_does_not_stop_a_run_that_does_not_enable_it(
    broken_site: Path, tmp_path: Path
) -> None:
    experiment = write(tmp_path / "tiny.toml", tiny_experiment(ADAMW, enable=None))
    runs = tmp_path / "runs"
    done = slmkit(
        "run", str(experiment), "--runs-dir", str(runs), pythonpath=(broken_site,), cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    start = next(e for e in single_run_log(runs) if e["event"] == "run_start")
    assert BROKEN_DIST not in start["plugins"]


def test_enabling_a_broken_plugin_is_a_one_line_error(broken_site: Path, tmp_path: Path) -> None:
    experiment = write(tmp_path / "tiny.toml", tiny_experiment(ADAMW, enable=[BROKEN_DIST]))
    done = slmkit("validate", str(experiment), pythonpath=(broken_site,), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert BROKEN_DIST in lines[0]
    assert "broken" in lines[0]
