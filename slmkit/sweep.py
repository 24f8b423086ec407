"""Sweeps: ``--sweep KEY=A,B,C`` options, their grid, and the sweep id runs are tagged with.

Each ``--sweep`` names one dotted experiment key and its values in TOML syntax, separated
by commas (commas inside ``[...]``, ``{...}`` or quotes belong to the value). Several
``--sweep`` options make a grid: every combination is one run, the first option varying
slowest. A combination is applied like ``--set`` overrides, after the ``--set`` ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from slmkit.config.reading import parse_override
from slmkit.errors import ConfigError
from slmkit.rundir import new_run_id


def split_values(raw: str) -> list[str]:
    """``"1,[2, 3],'a,b'"`` -> ``["1", "[2, 3]", "'a,b'"]``: top-level commas only."""
    values: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for char in raw:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def parse_sweeps(texts: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The ``--sweep`` options as ``(key, [raw values])``, checked for shape."""
    axes: list[tuple[str, list[str]]] = []
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        values = split_values(raw) if sep else []
        if not sep or not key or not raw.strip() or any(not v for v in values):
            raise ConfigError("--sweep", text, "expected KEY=V1,V2,... e.g. model.n_layers=2,4,6")
        if any(key == seen for seen, _ in axes):
            raise ConfigError("--sweep", key, "given twice; list all its values in one --sweep")
        for value in values:
            parse_override(f"{key}={value}")  # the same key and value checks as --set
        axes.append((key, values))
    return axes


def grid(axes: Sequence[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination of the axes' values, as lists of ``KEY=VALUE`` overrides."""
    keys = [key for key, _ in axes]
    return [
        [f"{key}={value}" for key, value in zip(keys, combo, strict=True)]
        for combo in itertools.product(*(values for _, values in axes))
    ]


def new_sweep_id(name: str) -> str:
    """``sweep-<UTC time>-<experiment name>-<4 hex digits>``."""
    return f"sweep-{new_run_id(name)}"
