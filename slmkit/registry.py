"""The typed component registry: which plugin provides which tokenizer, block, optimizer...

Plugins fill it through the registration hooks; the experiment looks components up by
kind and name, restricted to the plugins that take part in the run.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Sequence
from typing import Any

import attrs

from slmkit.errors import PluginError


@attrs.define(frozen=True)
class Component:
    """One registered component: its factory, its options class and who provided it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    options: type
    plugin: str

    def build_options(self) -> Any:
        """The options instance with every default (for listings and tests)."""
        return self.options()


class Registry:
    """Components by kind and name; a name may be provided by several plugins.

    ``kinds`` orders listings (the order of :data:`slmkit.kinds.KINDS`).
    """

    def __init__(self, kinds: Sequence[str]) -> None:
        self.kinds = tuple(kinds)
        self._providers: dict[tuple[str, str], list[Component]] = {}

    def add(self, component: Component) -> None:
        """Record a component (conflicts are reported when a run needs the name)."""
        self._providers.setdefault((component.kind, component.name), []).append(component)

    def remove_plugin(self, plugin: str) -> None:
        """Forget every component that ``plugin`` registered."""
        for key, components in list(self._providers.items()):
            kept = [c for c in components if c.plugin != plugin]
            if kept:
                self._providers[key] = kept
            else:
                del self._providers[key]

    def components(self, kind: str | None = None) -> list[Component]:
        """All registered components (of one kind), sorted by kind and name."""
        found = [c for cs in self._providers.values() for c in cs]
        if kind is not None:
            found = [c for c in found if c.kind == kind]
        return sorted(found, key=lambda c: (self.kinds.index(c.kind), c.name, c.plugin))

    def provided_by(self, plugin: str) -> dict[str, list[str]]:
        """``{kind: [names]}`` for the components that ``plugin`` registered."""
        provided: dict[str, list[str]] = {}
        for component in self.components():
            if component.plugin == plugin:
                provided.setdefault(component.kind, []).append(component.name)
        return provided

    def conflicts(self) -> list[list[Component]]:
        """Groups of components that share one kind and name across plugins."""
        return [cs for cs in self._providers.values() if len(cs) > 1]

    def lookup(self, kind: str, name: str, participants: Collection[str]) -> Component:
        """The component ``name`` of ``kind`` among the ``participants`` plugins.

        Raises :class:`PluginError` when no participant provides it (saying which installed
        plugin would, if one does) or when two participants both do.
        """
        every = self._providers.get((kind, name), [])
        taking_part = [c for c in every if c.plugin in participants]
        if len(taking_part) == 1:
            return taking_part[0]
        label = kind.replace("_", " ")
        if len(taking_part) > 1:
            who = " and ".join(repr(c.plugin) for c in taking_part)
            raise PluginError(
                f"{label} {name!r} is registered by both {who}; disable one of them in [plugins]"
            )
        if every:
            owner = every[0].plugin
            raise PluginError(
                f"{label} {name!r} is provided by plugin {owner!r}, which this experiment "
                f'does not enable: add it to [plugins] enable = ["{owner}"]'
            )
        known = sorted({c.name for c in self.components(kind) if c.plugin in participants})
        hint = difflib.get_close_matches(name, known, n=1)
        message = f"unknown {label} {name!r}"
        if hint:
            message += f" (did you mean {hint[0]!r}?)"
        known_list = ", ".join(known) if known else "none"
        raise PluginError(f"{message}; known: {known_list}")
