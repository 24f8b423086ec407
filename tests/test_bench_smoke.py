"""The benchmarks still run: each in its smallest mode, writing its JSON results.

Benchmarks are not tests (they measure and never fail a build), but nothing else would
notice one breaking when the code it drives changes. Each case runs ``bench.<name>.main``
in this process with results sent to a temporary folder (``--out`` where the benchmark
takes it, otherwise ``bench.RESULTS_DIR`` redirected, which ``bench.write_results``
reads), then checks the file has the keys the benchmark promises.

The benchmarks of bench/training.py, hooks.py, probes.py and checkpoint.py have ``--smoke`` (a tiny
model, 1-2 steps: seconds); convergence gets as small through ``--set`` (2 steps, one
validation batch, a 4-token sample). The others have no mode that small (sampling's
identity check always fills the context window, data starts four subprocesses that each
import torch, bpe trains on the whole of tinyshakespeare): about 4-9 s each on an idle
2-core machine, minutes on a loaded one, so they are marked slow.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path

import pytest

import bench

COMMON_KEYS = {"benchmark", "measured_at", "machine"}
TINYSHAKESPEARE_CASES = {"convergence", "bpe"}

CASES = [
    pytest.param(
        "training",
        ["--smoke"],
        {"config", "configs", "bf16_over_fp32_tokens_per_s", "gemm", "val_loss", "profile"},
        id="training",
    ),
    pytest.param("hooks", ["--smoke"], {"config", "configs", "targets"}, id="hooks"),
    pytest.param(
        "probes", ["--smoke"], {"config", "configs", "probes_alone_ms", "targets"}, id="probes"
    ),
    pytest.param(
        "checkpoint",
        ["--smoke"],
        {"config", "ms", "file_bytes", "checksum_verified"},
        id="checkpoint",
    ),
    pytest.param(
        "sampling",
        ["--quick", "--new-tokens", "8"],
        {"config", "by_threads", "identity"},
        id="sampling",
        marks=pytest.mark.slow,  # fills the context window with both paths
    ),
    pytest.param(
        "data",
        ["--quick", "--size-mb", "0.02"],
        {"cases", "repeats"},
        id="data",
        marks=pytest.mark.slow,  # four subprocesses, each importing torch
    ),
    pytest.param(
        "convergence",
        [
            "--quick",
            *("--set", "training.max_steps=2", "--set", "training.eval_every=0"),
            *("--set", "training.eval_batches=1", "--set", "training.checkpoint_every=0"),
            *("--set", "sampling.max_new_tokens=4"),
        ],
        {"config", "summary", "evals"},
        id="convergence",
    ),
    pytest.param(
        "distributed",
        ["--smoke"],
        {"config", "configs", "ratios"},
        id="distributed",
        marks=pytest.mark.slow,  # four training subprocesses, two of them torchrun
    ),
    pytest.param(
        "scaling_study",
        ["--smoke", "--resamples", "10"],
        {"config", "runs", "fit", "wall_s"},
        id="scaling_study",
        marks=pytest.mark.slow,  # six runs, each reading and encoding the corpus
    ),
    pytest.param(
        "bpe",
        ["--quick"],
        {"cases", "repeats"},
        id="bpe",
        marks=pytest.mark.slow,  # trains BPE on the whole of tinyshakespeare, twice
    ),
]
#: the benchmarks that take ``--out DIR``
TAKES_OUT = {"training", "hooks", "checkpoint", "distributed", "probes"}


def test_every_benchmark_has_a_smoke_case() -> None:
    """Every benchmark ``python -m bench`` would run (each ``bench/<name>.py``) has a case."""
    from bench.__main__ import available

    missing = set(available()) - {case.values[0] for case in CASES}
    assert not missing, f"no smoke case in {Path(__file__).name} for {sorted(missing)}"


@pytest.mark.parametrize(("name", "argv", "keys"), CASES)
def test_benchmark_smoke(
    name: str,
    argv: list[str],
    keys: set[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """``bench.<name>.main`` in its smallest mode writes ``<name>*.json`` with its keys."""
    if name in TINYSHAKESPEARE_CASES and not bench.TINYSHAKESPEARE.resolve().is_file():
        pytest.skip(f"{bench.TINYSHAKESPEARE.resolve()} is missing")
    if name == "convergence":
        # it prints the results path relative to the project root, so the folder must be
        # inside it: a temporary one under the git-ignored runs/
        (bench.ROOT / "runs").mkdir(exist_ok=True)
        holder = tempfile.TemporaryDirectory(prefix=".bench-smoke-", dir=bench.ROOT / "runs")
        request.addfinalizer(holder.cleanup)
        out = Path(holder.name)
    else:
        out = tmp_path / "results"
    monkeypatch.setattr(bench, "RESULTS_DIR", out)  # never bench/results
    monkeypatch.chdir(bench.ROOT)  # convergence changes directory; this restores it
    module = importlib.import_module(f"bench.{name}")
    module.main([*argv, *(["--out", str(out)] if name in TAKES_OUT else [])])
    written = sorted(out.glob(f"{name}*.json"))
    assert written, f"bench.{name} wrote no {name}*.json in {out}"
    data = json.loads(written[0].read_text(encoding="utf-8"))
    assert data["benchmark"].startswith(name)
    missing = (COMMON_KEYS | keys) - data.keys()
    assert not missing, f"{written[0].name} lacks {sorted(missing)}"
