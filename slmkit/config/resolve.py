"""Resolving an experiment: each table that picks a component, against the plugins.

The kinds table (:mod:`slmkit.kinds`) says which table picks which kind of component and
by which key. Resolution looks each component up once among the run's participating
plugins, structures its options, and keeps the registry entry on the section, so building
the run never looks it up again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from slmkit import kinds
from slmkit.config.reading import apply_overrides, read_toml
from slmkit.config.schema import (
    SECTION_TABLES,
    Experiment,
    ExperimentSection,
    PluginsSection,
    SamplingSection,
    TrainingSection,
)
from slmkit.config.structure import structure, type_name, unknown_key_message
from slmkit.errors import ConfigError, SlmkitError
from slmkit.kinds import Kind
from slmkit.plugins import PluginManager

#: tables that pick no component
_PLAIN_TABLES: dict[str, type] = {
    "experiment": ExperimentSection,
    "plugins": PluginsSection,
    "training": TrainingSection,
    "sampling": SamplingSection,
}


def tables() -> tuple[str, ...]:
    """Every table an experiment file may hold, in the order dumps show them."""
    return (*SECTION_TABLES, *(kind.table for kind in kinds.KINDS if kind.many))


def load_experiment(
    path: str | Path, manager: PluginManager, overrides: Sequence[str] = ()
) -> Experiment:
    """Read, override, validate and resolve an experiment file.

    It may enable a tracker once (:attr:`Kind.once_each`); experiments saved in checkpoints
    are not held to that, so that no checkpoint written before the rule is refused.
    """
    path = Path(path)
    data = apply_overrides(read_toml(path), overrides)
    exp = experiment_from_dict(data, manager, source=str(path))
    for kind in kinds.KINDS:
        if kind.once_each:
            _refuse_repeats(kind, exp.arrays[kind.table], str(path))
    return exp


def experiment_from_dict(
    data: Mapping[str, Any], manager: PluginManager, source: str
) -> Experiment:
    """Validate and resolve a parsed experiment; ``source`` names it in errors."""
    known = tables()
    for table in data:
        if table not in known:
            message = unknown_key_message(table, known).replace("unknown key", "unknown table")
            raise ConfigError(source, table, message)

    sections: dict[str, Any] = {
        table: structure(data.get(table, {}), cls, source, table)
        for table, cls in _PLAIN_TABLES.items()
    }
    plugins = sections["plugins"]
    try:
        participants = manager.participants(plugins.enable, plugins.disable)
    except SlmkitError as exc:
        raise ConfigError(source, None, str(exc)) from None  # the message names the key

    arrays: dict[str, tuple[Any, ...]] = {}
    for kind in kinds.KINDS:
        if not kind.many:
            table = data.get(kind.table, {})
            sections[kind.table] = _resolve(kind, table, manager, participants, source, kind.table)
            continue
        entries = data.get(kind.table, [])
        if not isinstance(entries, list):
            raise ConfigError(source, kind.table, f"expected an array of tables ([[{kind.table}]])")
        arrays[kind.table] = tuple(
            _resolve(kind, entry, manager, participants, source, f"{kind.table}.{i}")
            for i, entry in enumerate(entries)
        )
    return Experiment(**sections, arrays=arrays, participants=tuple(participants), source=source)


def resolve_table(
    kind_name: str,
    table: Mapping[str, Any],
    manager: PluginManager,
    participants: Sequence[str],
    source: str,
    prefix: str,
) -> Any:
    """One table of the kind ``kind_name`` resolved on its own (``slmkit export`` builds a
    tracker from one ``[[trackers]]`` table); errors name ``source`` and ``prefix``."""
    (kind,) = [k for k in kinds.KINDS if k.name == kind_name]
    return _resolve(kind, table, manager, participants, source, prefix)


def _resolve(
    kind: Kind,
    table: Any,
    manager: PluginManager,
    participants: Sequence[str],
    source: str,
    prefix: str,
) -> Any:
    """One table of ``kind``: its kernel keys, its component, and the component's options."""
    if not isinstance(table, Mapping):
        raise ConfigError(source, prefix, f"expected a table, got {type_name(table)}")
    cls = kind.section
    kernel_keys = [f.name for f in attrs.fields(cls) if f.name not in ("options", "component")]
    name = table.get(kind.name_key, attrs.fields_dict(cls)[kind.name_key].default)
    if name is attrs.NOTHING:
        raise ConfigError(source, f"{prefix}.{kind.name_key}", "required key is missing")
    if not isinstance(name, str):
        raise ConfigError(source, f"{prefix}.{kind.name_key}", f"expected a string, got {name!r}")
    try:
        component = manager.component(kind.name, name, participants)
    except SlmkitError as exc:
        raise ConfigError(source, f"{prefix}.{kind.name_key}", str(exc)) from None
    option_keys = [f.name for f in attrs.fields(component.options)]
    for key in table:
        if key not in kernel_keys and key not in option_keys:
            known = kernel_keys + option_keys
            raise ConfigError(source, f"{prefix}.{key}", unknown_key_message(key, known))
    options = structure(
        {k: v for k, v in table.items() if k in option_keys}, component.options, source, prefix
    )
    section = structure({k: v for k, v in table.items() if k in kernel_keys}, cls, source, prefix)
    return attrs.evolve(section, options=options, component=component)


def _refuse_repeats(kind: Kind, sections: Sequence[Any], source: str) -> None:
    """One line naming the second enabled entry of a component enabled twice."""
    first: dict[str, int] = {}
    for i, section in enumerate(sections):
        name = getattr(section, kind.name_key)
        if section.enabled and first.setdefault(name, i) != i:
            raise ConfigError(
                source, f"{kind.table}.{i}.{kind.name_key}",
                f"{kind.name} {name!r} is enabled twice (also {kind.table}.{first[name]}); "
                f"each {kind.name} may be enabled once",
            )  # fmt: skip
