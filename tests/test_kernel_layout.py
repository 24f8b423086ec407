"""The kernel's shape: small modules, imports that flow one way, kinds declared once."""

from __future__ import annotations

import ast
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import attrs
import pytest

import slmkit
from slmkit import kinds
from slmkit.components import ForwardHookFactory
from slmkit.config.resolve import experiment_from_dict
from slmkit.errors import ConfigError
from slmkit.plugins import PluginManager

KERNEL = Path(slmkit.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(KERNEL.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kernel_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(KERNEL.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every slmkit module ``path`` imports anywhere: at the top, in functions, or under
    ``TYPE_CHECKING``. ``from slmkit.x import y`` counts ``slmkit.x.y`` when that is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def test_no_kernel_module_is_over_400_lines_and_the_loop_is_short() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in kernel_modules().items()}
    assert {name: n for name, n in sizes.items() if n > 400} == {}
    assert sizes["slmkit.train"] <= 300


def test_kernel_imports_have_no_cycle() -> None:
    modules = kernel_modules()
    graph = {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}
    # The package itself re-exports the plugin API; importing a submodule does not run it
    # for its names, so only explicit ``from slmkit import x`` / ``import slmkit`` edges count.
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_every_kind_has_its_hookspec_and_a_section_with_its_name_key() -> None:
    from slmkit import hookspecs

    assert len({kind.name for kind in kinds.KINDS}) == len(kinds.KINDS)
    for kind in kinds.KINDS:
        assert getattr(getattr(hookspecs, kind.hook), "slmkit_spec", None) is not None, kind.hook
        fields = attrs.fields_dict(kind.section)
        assert {kind.name_key, "options", "component"} <= set(fields), kind.name


# -- a kind added by one table entry and its hookspec -------------------------------------


@attrs.define(frozen=True)
class WidgetSection:
    """One ``[[widgets]]`` table."""

    name: str
    enabled: bool = True
    options: Any = None
    component: Any = attrs.field(default=None, eq=False)


@attrs.define(frozen=True)
class WidgetOptions:
    size: int = attrs.field(default=1, validator=slmkit.positive)


def widget_specs() -> types.ModuleType:
    """A module with the new kind's registration hookspec, as hookspecs.py would hold it."""
    module = types.ModuleType("widget_specs")

    @slmkit.hookspecs.hookspec
    def register_widgets(register: slmkit.Register) -> None:
        """Register widget components."""

    module.register_widgets = register_widgets  # type: ignore[attr-defined]
    return module


class WidgetPlugin:
    @slmkit.hookimpl
    def register_widgets(self, register: slmkit.Register) -> None:
        register("knob", lambda options: ("a knob", options.size), options=WidgetOptions)


def test_a_new_kind_is_one_table_entry_plus_its_hookspec(monkeypatch) -> None:
    widget = kinds.Kind("widget", "register_widgets", "widgets", "name", WidgetSection,
                        ForwardHookFactory, many=True)  # fmt: skip
    monkeypatch.setattr(kinds, "KINDS", (*kinds.KINDS, widget))
    manager = PluginManager(entry_points=False)
    manager.pm.add_hookspecs(widget_specs())
    manager.load()
    info = manager.add(WidgetPlugin(), "widgets-plugin")
    assert info.error is None and info.provides == {"widget": ["knob"]}
    assert manager.registry.components("widget")[0].plugin == "widgets-plugin"

    data = {"plugins": {"enable": ["widgets-plugin"]}, "widgets": [{"name": "knob", "size": 3}]}
    exp = experiment_from_dict(data, manager, "w.toml")
    (section,) = exp.arrays["widgets"]
    assert section.component.factory(section.options) == ("a knob", 3)  # resolved once, kept
    assert exp.to_dict()["widgets"] == [{"name": "knob", "enabled": True, "size": 3}]
    assert tomllib.loads(exp.to_toml())["widgets"] == exp.to_dict()["widgets"]

    with pytest.raises(ConfigError, match=r"w.toml: widgets.0.size: must be > 0, got 0"):
        experiment_from_dict({**data, "widgets": [{"name": "knob", "size": 0}]}, manager, "w.toml")
    with pytest.raises(ConfigError, match=r"widgets.0.name: unknown widget 'dial'"):
        experiment_from_dict({**data, "widgets": [{"name": "dial"}]}, manager, "w.toml")


def test_torch_free_parts_stay_torch_free() -> None:
    # the kinds table, the schema and plugin loading are read by commands that never train
    import subprocess

    code = (
        "import sys, slmkit.kinds, slmkit.config.resolve, slmkit.config.diff, slmkit.plugins;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
