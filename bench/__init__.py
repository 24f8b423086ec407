"""Benchmarks of slmkit: sampling speed, data-pipeline cost, convergence of quick.toml.

Run them with ``uv run python -m bench [NAME ...] [--quick]``; each prints a table and
writes ``bench/results/<name>.json``. Benchmarks are not tests: they measure, and report
whether a target was met, but never fail a build.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: benchmark modules under ``bench/``, in the order ``python -m bench`` runs them
BENCHMARKS: tuple[str, ...] = ("sampling", "data", "convergence")

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
#: the shared copy of tinyshakespeare, relative to the project root (never copied)
TINYSHAKESPEARE = ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        # other jobs share this machine: the 1/5/15-minute load averages when measured
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line naming the machine, for the top of a table."""
    m = info or machine()
    return (
        f"{m['cpu_count']}-core CPU ({m['cpu']}), torch {m['torch_version']}, "
        f"{m['torch_threads']} torch threads, Python {m['python_version']}; "
        f"load average {' '.join(str(x) for x in m['load_average'])}"
    )


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (the folder is created; it is git-ignored)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {
        "benchmark": name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def fmt_spread(s: dict[str, float], fmt: str = "{:.1f}") -> str:
    """``median (min–max)``."""
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (Markdown-compatible)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_args(parser: Any, argv: Sequence[str] | None) -> Any:
    """Parse a benchmark's options; options meant for other benchmarks are named, ignored."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"({parser.prog}: ignoring options it does not take: {' '.join(unknown)})")
    return args
