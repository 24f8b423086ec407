"""Sweeps: ``--sweep KEY=A,B,C`` options, seeds, their grid, and the sweep id runs are
tagged with.

Each ``--sweep`` names one dotted experiment key and its values in TOML syntax, separated
by commas (commas inside ``[...]``, ``{...}`` or quotes belong to the value). Several
``--sweep`` options make a grid: every combination is one run, the first option varying
slowest. A combination is applied like ``--set`` overrides, after the ``--set`` ones.

One ``--sweep`` may also name several keys that change together (a "zipped" axis, such as a
model's depth and width): ``KEY1,KEY2=[A1,A2],[B1,B2]`` is two runs, one with ``KEY1=A1``
and ``KEY2=A2``, one with ``KEY1=B1`` and ``KEY2=B2``.

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


#: one axis of a sweep: the keys it sets, and for each of its values one raw TOML text per key
Axis = tuple[list[str], list[list[str]]]

SHAPE = "expected KEY=V1,V2,... e.g. model.n_layers=2,4,6 (or KEY1,KEY2=[A1,A2],[B1,B2],...)"


def parse_sweeps(texts: Sequence[str]) -> list[Axis]:
    """The ``--sweep`` options as axes, checked for shape and their values as ``--set``
    checks them."""
    axes: list[Axis] = []
    for text in texts:
        head, sep, raw = text.partition("=")
        keys = [key.strip() for key in head.split(",")]
        values = split_values(raw) if sep else []
        if not sep or not all(keys) or not raw.strip() or any(not v for v in values):
            raise ConfigError("--sweep", text, SHAPE)
        for key in keys:
            if any(key in seen for seen, _ in axes) or keys.count(key) > 1:
                raise ConfigError("--sweep", key, "given twice; list all its values in one --sweep")
            if key == SEEDS_KEY:
                raise ConfigError("--sweep", key, "seeds are an axis of their own: use --seeds N")
        rows = [zipped_values(keys, value) for value in values]
        for row in rows:
            for key, value in zip(keys, row, strict=True):
                parse_override(f"{key}={value}")  # the same key and value checks as --set
        axes.append((keys, rows))
    return axes


def zipped_values(keys: list[str], value: str) -> list[str]:
    """One value of an axis as one raw text per key: ``value`` itself for one key, the items
    of ``[A1,A2,...]`` for several."""
    if len(keys) == 1:
        return [value]
    items = split_values(value[1:-1]) if value.startswith("[") and value.endswith("]") else []
    if len(items) != len(keys) or not all(items):
        raise ConfigError(
            "--sweep", ",".join(keys),
            f"{value}: expected [V1,V2,...] with one value for each of the {len(keys)} keys",
        )  # fmt: skip
    return items


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


def seed_axis(axes: Sequence[Axis], seeds: Sequence[int]) -> list[Axis]:
    """``axes`` with the seed axis appended last, so it varies fastest (no seeds: as is)."""
    if not seeds:
        return list(axes)
    if any(SEED_KEY in keys for keys, _ in axes):
        raise ConfigError("--sweep", SEED_KEY, "swept twice: by --sweep and by the seeds")
    return [*axes, ([SEED_KEY], [[str(s)] for s in seeds])]


def axis_keys(axes: Sequence[Axis]) -> list[str]:
    """Every key the axes set, in order (the sweep table's extra columns)."""
    return [key for keys, _ in axes for key in keys]


def grid(axes: Sequence[Axis]) -> list[list[str]]:
    """Every combination of the axes' values, as lists of ``KEY=VALUE`` overrides."""
    return [
        [f"{key}={value}" for (keys, _), row in zip(axes, combo, strict=True)
         for key, value in zip(keys, row, strict=True)]
        for combo in itertools.product(*(rows for _, rows in axes))
    ]  # fmt: skip


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
