"""The plugin manager: built-in plugins, entry-point plugins, and which take part in a run.

Built-ins are listed in :data:`DEFAULT_PLUGINS` and registered exactly like third-party
plugins, which come from the ``slmkit`` entry-point group. Each plugin is loaded on its
own: one that fails to import, to register, or that implements a hook slmkit does not
define, is recorded as broken with its error, and every other plugin keeps working.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import os
import traceback
from collections.abc import Callable, Collection, Iterable
from typing import Any

import attrs
import pluggy

from slmkit import hookspecs, kinds
from slmkit.errors import HookFailure, PluginError
from slmkit.kinds import Kind
from slmkit.options import NoOptions
from slmkit.registry import Component, Registry

#: built-in plugins, as dotted module paths, registered like any other plugin
DEFAULT_PLUGINS: tuple[str, ...] = (
    "slmkit_builtin.char",
    "slmkit_builtin.bpe",
    "slmkit_builtin.gpt",
    "slmkit_builtin.adamw",
    "slmkit_builtin.muon",
    "slmkit_builtin.corpora",
    "slmkit_builtin.synthetic",
    "slmkit_builtin.constant",
    "slmkit_builtin.schedules",
    "slmkit_builtin.forward_hooks",
    "slmkit_builtin.update_hooks",
    "slmkit_builtin.probes",
    "slmkit_builtin.tensorboard",
    "slmkit_builtin.trackio",
)
ENTRY_POINT_GROUP = "slmkit"
#: comma-separated plugin distributions to load from entry points (empty: none)
LOAD_PLUGINS_ENV = "SLMKIT_LOAD_PLUGINS"


#: the run-event hooks, in the order a run calls them
RUN_EVENTS = ("on_run_start", "on_step_end", "on_eval", "on_checkpoint", "on_run_end")


class RunEvents:
    """The run-event hooks of a run, called by name: ``events("on_eval", run=run, ...)``.

    ``RunEvents()`` calls nobody: what ranks other than 0 hold under torchrun (rank 0
    calls the run events, once for the whole run).
    """

    def __init__(self, callers: dict[str, Callable[..., None]] | None = None) -> None:
        self._callers = callers or {}

    def __call__(self, event: str, **kwargs: Any) -> None:
        """Call every participant's implementation of ``event`` with ``kwargs``."""
        caller = self._callers.get(event)
        if caller is not None:
            caller(**kwargs)


@attrs.define
class PluginInfo:
    """What ``slmkit plugins`` shows about one plugin."""

    name: str
    version: str | None
    builtin: bool
    source: str  # "builtin", or "entry point <group>:<name>", or "inline"
    error: str | None = None
    hooks: list[str] = attrs.Factory(list)
    provides: dict[str, list[str]] = attrs.Factory(dict)

    @property
    def broken(self) -> bool:
        """Whether the plugin failed to load or register."""
        return self.error is not None

    def as_json(self) -> dict[str, Any]:
        """The plugin as a JSON object (the ``slmkit plugins --json`` format)."""
        return {
            "name": self.name,
            "version": self.version,
            "builtin": self.builtin,
            "source": self.source,
            "hooks": self.hooks,
            "provides": self.provides,
            "error": self.error,
        }


def _describe(exc: BaseException) -> str:
    """One line for an exception: its type and message, and where it was raised."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


class PluginManager:
    """Loads plugins, builds the component registry, and resolves who takes part in a run.

    ``PluginManager()`` loads the built-ins and the installed entry points on first use.
    Tests build a fresh one with ``PluginManager(default_plugins=(), entry_points=False)``
    and :meth:`add` inline plugins.
    """

    def __init__(
        self,
        default_plugins: Iterable[str] = DEFAULT_PLUGINS,
        *,
        entry_points: bool = True,
        environ: dict[str, str] | None = None,
    ) -> None:
        self._default_plugins = tuple(default_plugins)
        self._use_entry_points = entry_points
        self._environ = os.environ if environ is None else environ
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry([kind.name for kind in kinds.KINDS])
        self.plugins: dict[str, PluginInfo] = {}
        self._loaded = False

    # -- loading ---------------------------------------------------------------------

    def load(self) -> PluginManager:
        """Load built-ins and entry points once (later calls do nothing)."""
        if self._loaded:
            return self
        self._loaded = True
        from slmkit import __version__

        for module_path in self._default_plugins:
            self._load_one(
                module_path,
                functools.partial(importlib.import_module, module_path),
                version=__version__,
                builtin=True,
                source="builtin",
            )
        if self._use_entry_points:
            self._load_entry_points()
        self.pm.check_pending()
        return self

    def _load_entry_points(self) -> None:
        wanted = self._environ.get(LOAD_PLUGINS_ENV)
        allowed = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
        seen: set[str] = set()
        for ep in sorted(
            importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name
        ):
            dist_name = ep.dist.name if ep.dist is not None else ep.name
            name = dist_name if dist_name not in seen else f"{dist_name}.{ep.name}"
            seen.add(name)
            if allowed is not None and dist_name not in allowed and ep.name not in allowed:
                continue
            self._load_one(
                name,
                ep.load,
                version=ep.dist.version if ep.dist is not None else None,
                builtin=False,
                source=f"entry point {ENTRY_POINT_GROUP}:{ep.name}",
            )

    def add(
        self, plugin: object, name: str, *, version: str | None = None, builtin: bool = False
    ) -> PluginInfo:
        """Register an already imported plugin object (tests, notebooks)."""
        self._loaded = True
        return self._load_one(
            name, lambda: plugin, version=version, builtin=builtin, source="inline"
        )

    def _load_one(
        self,
        name: str,
        importer: Callable[[], object],
        *,
        version: str | None,
        builtin: bool,
        source: str,
    ) -> PluginInfo:
        info = PluginInfo(name=name, version=version, builtin=builtin, source=source)
        self.plugins[name] = info
        # Every step runs plugin code (importing it, pluggy reading its attributes, its
        # registration hooks), and plugin code may raise anything, SystemExit and
        # KeyboardInterrupt included: each is caught, so a broken plugin never stops slmkit.
        try:
            plugin = importer()
        except BaseException as exc:
            info.error = f"import failed: {_describe(exc)}"
            return info
        step = "registration"
        try:
            self.pm.register(plugin, name=name)
            step = "checking its hook names"
            unknown = self._unknown_hooks(plugin)
            if unknown:
                self._discard(name)
                info.error = "; ".join(unknown)
                return info
            info.hooks = sorted(self._hook_names(plugin))
            step = "registering components"
            self._register_components(plugin, name)
            info.provides = self.registry.provided_by(name)
        except BaseException as exc:
            self._discard(name)
            info.error = f"{step} failed: {_describe(exc)}"
        return info

    def _discard(self, name: str) -> None:
        """Forget whatever a plugin that failed part-way had registered."""
        self.registry.remove_plugin(name)
        if self.pm.get_plugin(name) is not None:  # pluggy may hold a half-registered one
            self.pm.unregister(name=name)

    def _hook_names(self, plugin: object) -> list[str]:
        return [
            hook_name
            for hook_name, caller in vars(self.pm.hook).items()
            if any(impl.plugin is plugin for impl in caller.get_hookimpls())
        ]

    def _unknown_hooks(self, plugin: object) -> list[str]:
        """Hook implementations of ``plugin`` that match no slmkit hook spec."""
        spec_names = [
            n for n in dir(hookspecs) if getattr(getattr(hookspecs, n), "slmkit_spec", None)
        ]
        problems = []
        for hook_name in self._hook_names(plugin):
            caller = getattr(self.pm.hook, hook_name)
            if caller.has_spec():
                continue
            if all(impl.optionalhook for impl in caller.get_hookimpls()):
                continue
            hint = difflib.get_close_matches(hook_name, spec_names, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"unknown hook {hook_name!r}{suggestion}")
        return problems

    def _register_components(self, plugin: object, plugin_name: str) -> None:
        for kind in kinds.KINDS:
            for impl in getattr(self.pm.hook, kind.hook).get_hookimpls():
                if impl.plugin is plugin:
                    register = self._registrar(kind, plugin_name)
                    impl.function(**{arg: register for arg in impl.argnames})

    def _registrar(self, kind: Kind, plugin_name: str) -> Callable[..., None]:
        """The ``register`` callable a plugin's registration hook of ``kind`` receives."""

        def register(name: str, factory: Callable[..., Any], options: type = NoOptions) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"{kind.name} name must be a non-empty string, got {name!r}")
            if not callable(factory):
                raise PluginError(f"{kind.name} {name!r}: factory is not callable")
            if not attrs.has(options):
                raise PluginError(f"{kind.name} {name!r}: options must be an attrs class")
            self.registry.add(Component(kind.name, name, factory, options, plugin_name))

        return register

    # -- queries ---------------------------------------------------------------------

    def all_plugins(self) -> list[PluginInfo]:
        """Every plugin seen, loaded or broken, in load order."""
        self.load()
        return list(self.plugins.values())

    def participants(
        self, enable: Collection[str] = (), disable: Collection[str] = ()
    ) -> list[str]:
        """The plugins that take part in a run: working built-ins unless disabled, plus ``enable``.

        Raises :class:`PluginError` for an enabled name that is not installed or is broken.
        """
        self.load()
        for name in disable:
            info = self.plugins.get(name)
            if info is None or not info.builtin:
                builtins = ", ".join(n for n, i in self.plugins.items() if i.builtin)
                raise PluginError(
                    f"plugins.disable: {name!r} is not a built-in plugin ({builtins})"
                )
        chosen = [n for n, i in self.plugins.items() if i.builtin and n not in disable]
        for name in enable:
            info = self.plugins.get(name)
            if info is None:
                installed = [n for n, i in self.plugins.items() if not i.builtin]
                hint = difflib.get_close_matches(name, installed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise PluginError(
                    f"plugins.enable: plugin {name!r} is not installed{suggestion}; "
                    "`slmkit plugins` lists the installed ones"
                )
            if name not in chosen:
                chosen.append(name)
        for name in enable:
            info = self.plugins[name]
            if info.broken:
                raise PluginError(f"plugins.enable: plugin {name!r} is broken: {info.error}")
        # A broken built-in takes no part; a run that needs one of its components fails
        # at the lookup, which names the broken plugins.
        return [n for n in chosen if not self.plugins[n].broken]

    def component(self, kind: str, name: str, participants: Collection[str]) -> Component:
        """Look up a component among ``participants``; errors mention broken plugins."""
        try:
            return self.registry.lookup(kind, name, participants)
        except PluginError as exc:
            broken = [i for i in self.plugins.values() if i.broken]
            if not broken or "unknown" not in str(exc):
                raise
            names = ", ".join(f"{i.name!r} ({i.error})" for i in broken)
            raise PluginError(f"{exc}; broken plugins that may provide it: {names}") from None

    def hook_caller(self, hook_name: str, participants: Collection[str]) -> Any:
        """A pluggy caller for ``hook_name`` that reaches only the ``participants``."""
        others = [
            self.pm.get_plugin(n)
            for n in self.plugins
            if n not in participants and self.pm.get_plugin(n) is not None
        ]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)

    def event_caller(self, hook_name: str, participants: Collection[str]) -> Callable[..., None]:
        """A caller for a run event that calls each participant's implementation in turn.

        Unlike a plain pluggy call, an exception is raised as :class:`HookFailure` naming
        the plugin and the hook.
        """
        impls = self.hook_caller(hook_name, participants).get_hookimpls()

        def call(**kwargs: Any) -> None:
            for impl in reversed(impls):  # pluggy's order: last registered first
                try:
                    impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
                except (Exception, SystemExit) as exc:  # sys.exit() too: logged as a failure
                    raise HookFailure(f"run event {hook_name}", impl.plugin_name, exc) from exc

        return call

    def run_events(self, participants: Collection[str]) -> RunEvents:
        """The run-event hooks of ``participants``, to call by name."""
        return RunEvents({name: self.event_caller(name, participants) for name in RUN_EVENTS})

    def versions(self, participants: Collection[str]) -> dict[str, str | None]:
        """``{plugin: version}`` of the participants, for the run log."""
        return {n: self.plugins[n].version for n in participants}
