"""Sweeps: ``--sweep KEY=A,B,C`` options, seeds, their grid, and the sweep id runs are
tagged with.

Each ``--sweep`` names one dotted experiment key and its values in TOML syntax, separated
by commas (commas inside ``[...]``, ``{...}`` or quotes belong to the value). Several
``--sweep`` options make a grid: every combination is one run, the first option varying
slowest. A combination is applied like ``--set`` overrides, after the ``--set`` ones.

Seeds are one more axis, the last (fastest varying), on ``experiment.seed``: ``--seeds N``
gives the seeds ``seed, seed + 1, ..., seed + N - 1`` of the experiment, and
``[experiment] seeds = [...]`` lists them (:func:`seed_values`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

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


#: the key the seed axis sets, and the one that lists seeds (never swept itself)
SEED_KEY, SEEDS_KEY = "experiment.seed", "experiment.seeds"


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
        if key == SEEDS_KEY:
            raise ConfigError("--sweep", key, "seeds are an axis of their own: use --seeds N")
        for value in values:
            parse_override(f"{key}={value}")  # the same key and value checks as --set
        axes.append((key, values))
    return axes


def seed_values(count: int | None, listed: Sequence[int], seed: int, source: str) -> list[int]:
    """The seeds of the seed axis (none: no seed axis).

    ``count`` is ``--seeds N`` (``None`` when not given), ``listed`` the experiment's
    ``seeds``, ``seed`` its ``seed``. ``--seeds N`` means ``seed .. seed + N - 1``, unless the
    experiment lists seeds: then N must be their number.
    """
    if count is not None and count < 1:
        raise ConfigError("--seeds", None, f"must be >= 1, got {count}")
    if not listed:
        return [seed + i for i in range(count or 0)]
    if count is not None and count != len(listed):
        raise ConfigError(
            source, SEEDS_KEY, f"lists {len(listed)} seeds but --seeds asks for {count}; "
            "give one of them, or make them agree",
        )  # fmt: skip
    return list(listed)


def seed_axis(
    axes: Sequence[tuple[str, list[str]]], seeds: Sequence[int]
) -> list[tuple[str, list[str]]]:
    """``axes`` with the seed axis appended last, so it varies fastest (no seeds: as is)."""
    if not seeds:
        return list(axes)
    if any(key == SEED_KEY for key, _ in axes):
        raise ConfigError("--sweep", SEED_KEY, "swept twice: by --sweep and by the seeds")
    return [*axes, (SEED_KEY, [str(s) for s in seeds])]


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


def member_tag(text: str) -> dict[str, Any]:
    """The sweep tag ``--sweep-member`` carries to a run a sweep started as a child process:
    ``{"id", "index", "size", "overrides"}`` as JSON, checked for shape."""
    try:
        tag = json.loads(text)
    except ValueError:
        tag = None
    keys = {"id": str, "index": int, "size": int, "overrides": list}
    if not (
        isinstance(tag, dict)
        and tag.keys() == keys.keys()
        and all(type(tag[key]) is kind for key, kind in keys.items())
        and 0 <= tag["index"] < tag["size"]
        and all(isinstance(o, str) for o in tag["overrides"])
    ):
        raise ConfigError(
            "--sweep-member", None, "expected the JSON sweep tag {id, index, size, overrides} "
            "that a sweep gives its runs (an option of sweeps run with --jobs)",
        )  # fmt: skip
    return tag
