"""Experiments compared as nested dicts: which dotted keys differ, and the hash of what
defines one (the same for a resolved :class:`~slmkit.config.schema.Experiment` and for
the ``experiment.toml`` a run wrote, so reading runs back needs neither torch nor plugins).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

#: keys that do not change which experiment a run is, so ``config_hash`` leaves them out and
#: a resume may change them: how long it trains, in steps or in FLOPs (a resume may extend
#: it; ``slmkit runs`` shows it apart), how many CPU threads compute it (recorded with the
#: environment) and the ``[[trackers]]`` it streams to (a whole table: they only watch).
#: Runs written before ``max_flops`` existed keep their hash.
NOT_HASHED = ("training.max_steps", "training.max_flops", "training.threads", "trackers")


def named_in(key: str, names: Sequence[str]) -> bool:
    """Whether the dotted ``key`` is one of ``names``, or inside a table one of them names."""
    return any(key == name or key.startswith(f"{name}.") for name in names)


def not_hashed(key: str) -> bool:
    """Whether the dotted ``key`` is one :data:`NOT_HASHED` names, or inside such a table."""
    return named_in(key, NOT_HASHED)


def config_hash(experiment: Mapping[str, Any]) -> str:
    """sha256 of the canonical experiment (sorted JSON), without :data:`NOT_HASHED` keys.

    Empty arrays of tables count as absent, as in ``experiment.toml``.
    """
    defining: dict[str, Any] = {}
    for table, value in experiment.items():
        if value == [] or not_hashed(table):
            continue
        if isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if not not_hashed(f"{table}.{k}")}
        defining[table] = value
    canonical = json.dumps(defining, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two experiment dicts."""
    flat_old, flat_new = flatten(old), flatten(new)
    return sorted(
        k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k)
    )


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_model": 128}}`` -> ``{"model.d_model": 128}``; arrays of tables by index."""
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list) and data and all(isinstance(v, Mapping) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}
