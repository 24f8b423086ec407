"""The example plugins ``plugins/slmkit-llama``, ``slmkit-lion`` and ``slmkit-attention-maps``.

All three distributions are built and installed together (``uv pip install --no-deps
--target``) into one throw-away folder, never into the project's environment, as
``tests/test_template_plugin.py`` does with the template; the ``slmkit`` command and each
example's own tests then run in subprocesses with that folder on ``PYTHONPATH``, so the
entry points are found exactly as installed plugins' would be. Each ``experiments/<name>.toml``
trains for a few steps on a shrunken model and its run is sampled from.

The subprocesses are started together (each pays torch's import on its own) and awaited
by module-scoped fixtures, which keeps this file's runtime down.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import torch
from conftest import install_distributions, plugin_env

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.1.0"
TIMEOUT = 300


#: distribution -> its folder, package, test module, entry point, components, hooks, experiment
EXAMPLES: dict[str, dict[str, Any]] = {
    "slmkit-llama": {
        "folder": ROOT / "plugins" / "slmkit-llama",
        "package": "slmkit_llama",
        "test_module": "test_llama",
        "entry_point": "llama",
        "provides": {"block": ["llama"]},
        "hooks": ["register_blocks"],
        "experiment": ROOT / "experiments" / "llama.toml",
    },
    "slmkit-lion": {
        "folder": ROOT / "plugins" / "slmkit-lion",
        "package": "slmkit_lion",
        "test_module": "test_lion",
        "entry_point": "lion",
        "provides": {"optimizer": ["lion"]},
        "hooks": ["register_optimizers"],
        "experiment": ROOT / "experiments" / "lion.toml",
    },
    "slmkit-attention-maps": {
        "folder": ROOT / "plugins" / "slmkit-attention-maps",
        "package": "slmkit_attention_maps",
        "test_module": "test_attention_maps",
        "entry_point": "attention_maps",
        "provides": {"forward_hook": ["attention_maps"]},
        "hooks": ["register_forward_hooks"],
        "experiment": ROOT / "experiments" / "attention_maps.toml",
    },
}
DISTS = list(EXAMPLES)

#: a run of a few seconds: 1 layer, d_model 32, context 32, 4 steps, evaluations at 2 and 4
SHRINK = [
    "training.max_steps=4",
    "training.log_every=1",
    "training.eval_every=2",
    "sampling.every=2",
    "model.n_layers=1",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.context_length=32",
    "training.batch_size=4",
    "training.eval_batches=2",
    "sampling.max_new_tokens=20",
    'training.device="cpu"',
]


# -- helpers -------------------------------------------------------------------------------


def _env(*pythonpath: Path) -> dict[str, str]:
    """The environment of a child process that sees the given folders as installed."""
    env = plugin_env(*pythonpath)
    env.setdefault("OMP_NUM_THREADS", "1")  # several tiny processes at once share the CPUs
    return env


def start(command: list[str], *, pythonpath: tuple[Path, ...], cwd: Path) -> subprocess.Popen[str]:
    """Start ``command`` in a fresh process (its output collected by :func:`finish`)."""
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=_env(*pythonpath),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    """Wait for a process started by :func:`start`; killed after ``TIMEOUT`` seconds."""
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def slmkit(*args: str) -> list[str]:
    """The command line of ``python -m slmkit ARGS`` (the ``slmkit`` command)."""
    return [sys.executable, "-m", "slmkit", *args]


def read_events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line]


def single_run(runs_dir: Path) -> Path:
    logs = list(runs_dir.glob("*/log.jsonl"))
    assert len(logs) == 1, logs
    return logs[0].parent


def junit_cases(report: Path) -> list[tuple[str, str, str]]:
    """``(classname, name, outcome)`` of every test case of a pytest JUnit XML report."""
    if not report.is_file():
        return []
    cases = []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        outcomes = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcome = ",".join(outcomes) or "passed"
        cases.append((case.get("classname", ""), case.get("name", ""), outcome))
    return cases


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three examples built and installed into one throw-away folder (one install)."""
    target = tmp_path_factory.mktemp("site")
    folders = {dist: example["folder"] for dist, example in EXAMPLES.items()}
    install_distributions(target, folders, "the example plugins")
    for example in EXAMPLES.values():
        package = example["package"]
        assert (target / package / "__init__.py").is_file()
        assert list(target.glob(f"{package}-{VERSION}.dist-info/entry_points.txt"))
    return target


@pytest.fixture(scope="module")
def outcomes(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Everything the tests look at, run in subprocesses started together.

    ``plugins``: ``slmkit plugins --json``; ``own_tests``: the examples' own tests (the
    pytest ``result`` and ``cases``, ``(classname, test, outcome)``); ``runs[dist]``:
    ``(result, runs_dir)`` of its experiment, shrunk; ``samples[dist]``: ``slmkit sample``
    of that run.
    """
    work = tmp_path_factory.mktemp("examples")
    site = (installed,)
    pending: dict[tuple[str, str], subprocess.Popen[str]] = {
        ("plugins", ""): start(slmkit("plugins", "--json"), pythonpath=site, cwd=work)
    }
    runs_dirs = {dist: work / f"runs-{dist}" for dist in DISTS}
    for dist, example in EXAMPLES.items():
        overrides = [arg for key in SHRINK for arg in ("--set", key)]
        command = slmkit(
            "run", str(example["experiment"]), *overrides, "--runs-dir", str(runs_dirs[dist])
        )
        pending["run", dist] = start(command, pythonpath=site, cwd=work)
    # the three examples' own tests in one pytest process (one torch import, not three);
    # the JUnit report says which example each test belongs to
    report = work / "own-tests.xml"
    own_tests = [str(e["folder"] / "tests") for e in EXAMPLES.values()]
    pending["own_tests", ""] = start(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         f"--junitxml={report}", *own_tests],
        pythonpath=site, cwd=ROOT / "plugins",
    )  # fmt: skip

    results: dict[str, Any] = {"own_tests": {}, "runs": {}, "samples": {}}
    samples: dict[str, subprocess.Popen[str]] = {}
    try:
        for (kind, dist), process in pending.items():
            result = finish(process)
            if kind == "plugins":
                results["plugins"] = result
            elif kind == "own_tests":
                results["own_tests"] = {"result": result, "cases": junit_cases(report)}
            else:
                results["runs"][dist] = (result, runs_dirs[dist])
                if result.returncode == 0:  # sample from it while the others finish
                    run_dir = single_run(runs_dirs[dist])
                    command = slmkit("sample", str(run_dir), "--max-new-tokens", "20")
                    samples[dist] = start(command, pythonpath=site, cwd=work)
        results["samples"] = {dist: finish(process) for dist, process in samples.items()}
    finally:  # leave no process behind, whatever went wrong
        for process in [*pending.values(), *samples.values()]:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def completed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"$ {' '.join(result.args)}\n{result.stdout}\n{result.stderr}"


# -- the examples, installed -----------------------------------------------------------------


def test_slmkit_plugins_lists_the_three_examples(outcomes: dict[str, Any]) -> None:
    completed(outcomes["plugins"])
    plugins = {p["name"]: p for p in json.loads(outcomes["plugins"].stdout)}
    for dist, example in EXAMPLES.items():
        assert dist in plugins, sorted(plugins)
        info = plugins[dist]
        assert info["version"] == VERSION
        assert info["builtin"] is False
        assert info["source"] == f"entry point slmkit:{example['entry_point']}"
        assert info["provides"] == example["provides"]
        assert info["hooks"] == example["hooks"]
        assert info["error"] is None
    assert all(p["error"] is None for p in plugins.values())
    assert "warning" not in outcomes["plugins"].stderr


@pytest.mark.parametrize("dist", DISTS)
def test_example_own_tests_pass_against_the_installed_copy(
    dist: str, outcomes: dict[str, Any], installed: Path
) -> None:
    own = outcomes["own_tests"]
    result = own["result"]
    module = EXAMPLES[dist]["test_module"]
    cases = [(name, outcome) for classname, name, outcome in own["cases"]
             if classname.split(".")[-1] == module]  # fmt: skip
    assert cases, f"no test of {dist} ran:\n{result.stdout}\n{result.stderr}"
    failed = [(name, outcome) for name, outcome in cases if outcome != "passed"]
    assert not failed, f"{failed}\n{result.stdout}\n{result.stderr}"
    completed(result)
    # the tests imported the installed copy, not the source tree (found without importing)
    package = EXAMPLES[dist]["package"]
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import importlib.util; print(importlib.util.find_spec({package!r}).origin)",
        ],
        cwd=EXAMPLES[dist]["folder"],
        env=_env(installed),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(installed)


@pytest.mark.parametrize("dist", DISTS)
def test_example_experiment_trains_and_samples(dist: str, outcomes: dict[str, Any]) -> None:
    result, runs_dir = outcomes["runs"][dist]
    completed(result)
    run_dir = single_run(runs_dir)
    events = read_events(run_dir / "log.jsonl")
    start_event = next(e for e in events if e["event"] == "run_start")
    assert start_event["plugins"][dist] == VERSION
    losses = [e["train_loss"] for e in events if e["event"] == "train_step"]
    assert len(losses) == 4
    assert all(loss == loss for loss in losses)  # no NaN
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 4]
    assert any(e["event"] == "run_end" for e in events)

    sample = outcomes["samples"][dist]
    completed(sample)
    assert sample.stdout.startswith("\n")  # the prompt (a newline), then the sample


def test_llama_run_has_rotary_blocks_and_no_position_table(outcomes: dict[str, Any]) -> None:
    _, runs_dir = outcomes["runs"]["slmkit-llama"]
    (ckpt,) = single_run(runs_dir).glob("checkpoints/step_4.pt")
    weights = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    assert not [k for k in weights if k.startswith("pos_emb")]
    assert {
        "blocks.0.norm_1.weight",
        "blocks.0.mlp.gate.weight",
        "blocks.0.attn.qkv.weight",
    } <= set(weights)
    assert weights["blocks.0.mlp.gate.weight"].shape == (88, 32)  # round(8/3 * 32) up to 8k


def test_lion_run_checkpoints_its_momentum(outcomes: dict[str, Any]) -> None:
    _, runs_dir = outcomes["runs"]["slmkit-lion"]
    (ckpt,) = single_run(runs_dir).glob("checkpoints/step_4.pt")
    optimizer = torch.load(ckpt, map_location="cpu", weights_only=True)["optimizer"]
    assert optimizer["state"] and all(set(s) == {"exp_avg"} for s in optimizer["state"].values())
    groups = optimizer["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0]  # decay groups only
    assert [tuple(g["betas"]) for g in groups] == [(0.9, 0.99), (0.9, 0.99)]


def test_attention_maps_run_wrote_one_png_per_layer_and_evaluation(
    outcomes: dict[str, Any],
) -> None:
    _, runs_dir = outcomes["runs"]["slmkit-attention-maps"]
    run_dir = single_run(runs_dir)
    images = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.png"))
    assert images == ["attention_maps/step_2/layer_0.png", "attention_maps/step_4/layer_0.png"]
    for image in images:
        data = (run_dir / image).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert data[12:16] == b"IHDR" and data.endswith(b"IEND\xae\x42\x60\x82")
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        # 2 heads of 32 x 32 positions (the context), 4 pixels each, one gap between
        assert (width, height) == (4 * (32 + 1 + 32), 4 * 32)
    logged = [
        e for e in read_events(run_dir / "log.jsonl")
        if e["event"] == "forward_hook" and e["name"] == "attention_maps"
    ]  # fmt: skip
    assert [(e["step"], e["phase"], e["metrics"]["files"]) for e in logged] == [
        (2, "eval", images[:1]),
        (4, "eval", images[1:]),
    ]


def test_the_kernel_imports_none_of_the_examples() -> None:
    packages = "|".join(e["package"] for e in EXAMPLES.values())
    pattern = re.compile(rf"\b({packages})\b")
    kernel = [
        *(ROOT / "slmkit").rglob("*.py"),
        *(ROOT / "plugins" / "slmkit_builtin").rglob("*.py"),
    ]
    assert kernel
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in kernel
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
