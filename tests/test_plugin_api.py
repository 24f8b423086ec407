"""The plugin API: ``import slmkit`` and the names in ``slmkit.__all__``, nothing else.

Every plugin module in ``plugins/`` (the built-ins and the example distributions, their
tests aside) is read with :mod:`ast`: importing a submodule of slmkit, or using a name of
``slmkit`` that ``__all__`` does not list, fails naming the file and the line. Their tests
may use ``slmkit.testing`` besides, and nothing else of the kernel. The API
itself must resolve, load torch only when a torch-dependent name is first used, and match
the list documented in docs/writing-plugins.md.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import slmkit

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"
WRITING_PLUGINS = ROOT / "docs" / "writing-plugins.md"
API_BEGIN = "<!-- plugin-api: begin"
API_END = "<!-- plugin-api: end -->"


#: what a plugin's tests may use besides the plugin API: the testing helpers
TESTS_MAY_USE = frozenset({"testing"})


def plugin_sources(*, tests: bool = False) -> list[Path]:
    """Every ``.py`` file under ``plugins/`` outside ``tests`` folders (or inside, if ``tests``)."""
    sources = []
    for path in PLUGINS.rglob("*.py"):
        parts = path.relative_to(PLUGINS).parts
        if ("tests" in parts) == tests and not any(
            p.startswith(".") or p == "build" for p in parts
        ):
            sources.append(path)
    return sorted(sources)


def _is_slmkit_submodule(module: str, allowed: frozenset[str]) -> bool:
    return module.startswith("slmkit.") and module.split(".")[1] not in allowed


def api_violations(
    source: str, filename: str, api: set[str], allowed: frozenset[str] = frozenset()
) -> list[str]:
    """``file:line: what`` for each use of slmkit outside the plugin API in ``source``.

    ``allowed``: submodules of slmkit that may be used besides (``testing`` in tests).
    """
    api = api | allowed
    tree = ast.parse(source, filename)
    found: list[str] = []
    aliases = set()  # the names ``slmkit`` is bound to (``import slmkit [as sk]``)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_slmkit_submodule(alias.name, allowed):
                    found.append(f"{filename}:{node.lineno}: import {alias.name}")
                elif alias.name == "slmkit" or (
                    alias.name.startswith("slmkit.") and alias.asname is None
                ):  # ``import slmkit.testing`` binds ``slmkit`` too
                    aliases.add(alias.asname or "slmkit")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _is_slmkit_submodule(node.module, allowed):
                found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
            elif node.module == "slmkit":
                for alias in node.names:
                    if alias.name not in api:
                        found.append(
                            f"{filename}:{node.lineno}: from slmkit import {alias.name} "
                            "(not in slmkit.__all__)"
                        )
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr not in api
        ):
            found.append(f"{filename}:{node.lineno}: slmkit.{node.attr} (not in slmkit.__all__)")
    return found


# -- (a) plugins use nothing but the API ---------------------------------------------------


def test_plugins_import_only_the_plugin_api() -> None:
    sources = plugin_sources()
    assert len(sources) >= 10, sources  # the built-ins and the four example distributions
    api = set(slmkit.__all__)
    found: list[str] = []
    for path in sources:
        found += api_violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), api)
    assert not found, "plugins must use only `import slmkit` and slmkit.__all__:\n" + "\n".join(
        found
    )


def test_plugin_tests_use_only_the_plugin_api_and_slmkit_testing() -> None:
    sources = plugin_sources(tests=True)
    assert len(sources) >= 4, sources  # the four example distributions' tests
    api = set(slmkit.__all__)
    found: list[str] = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        found += api_violations(text, str(path.relative_to(ROOT)), api, TESTS_MAY_USE)
    assert not found, (
        "plugin tests must use only `import slmkit`, slmkit.__all__ and slmkit.testing:\n"
        + "\n".join(found)
    )


def test_the_checker_names_file_and_line_of_each_violation() -> None:
    source = textwrap.dedent(
        """\
        import slmkit
        import slmkit.components
        from slmkit.options import positive
        from slmkit import hookimpl, train
        import slmkit_lion

        x = slmkit.HookPoint
        y = slmkit.hooks.HookPoint
        """
    )
    assert api_violations(source, "p.py", set(slmkit.__all__)) == [
        "p.py:2: import slmkit.components",
        "p.py:3: from slmkit.options import ...",
        "p.py:4: from slmkit import train (not in slmkit.__all__)",
        "p.py:8: slmkit.hooks (not in slmkit.__all__)",
    ]
    in_tests = textwrap.dedent(
        """\
        import slmkit.testing
        from slmkit import testing
        from slmkit.testing import tiny_model
        slmkit.testing.train_tiny
        from slmkit.plugins import PluginManager
        slmkit.build
        """
    )
    assert api_violations(in_tests, "t.py", set(slmkit.__all__), TESTS_MAY_USE) == [
        "t.py:5: from slmkit.plugins import ...",
        "t.py:6: slmkit.build (not in slmkit.__all__)",
    ]
    assert api_violations(in_tests, "p.py", set(slmkit.__all__))[:2] == [
        "p.py:1: import slmkit.testing",
        "p.py:2: from slmkit import testing (not in slmkit.__all__)",
    ]
    aliased = "import slmkit as sk\nsk.train\n"
    assert api_violations(aliased, "q.py", set(slmkit.__all__)) == [
        "q.py:2: slmkit.train (not in slmkit.__all__)"
    ]


# -- (b) the API resolves ------------------------------------------------------------------


def test_every_name_in_all_resolves() -> None:
    assert len(slmkit.__all__) == len(set(slmkit.__all__))
    for name in slmkit.__all__:
        value = getattr(slmkit, name)
        assert value is not None, name
        # a submodule of the same name would replace the API's object once imported
        assert not isinstance(value, types.ModuleType), f"slmkit.{name} is a module"


def test_no_api_name_is_shadowed_by_a_submodule() -> None:
    # Importing slmkit.<x> (as the kernel does) binds the *module* to slmkit.<x>, hiding
    # the API's lazily loaded object of that name from every plugin.
    submodules = {info.name for info in pkgutil.iter_modules(slmkit.__path__)}
    shadowed = sorted(submodules & set(slmkit.__all__))
    assert not shadowed, f"API names that are also submodules of slmkit: {shadowed}"


# -- (c) torch only on first use -----------------------------------------------------------


def test_torch_loads_only_with_the_first_torch_dependent_name() -> None:
    script = textwrap.dedent(
        """\
        import json, sys
        import slmkit
        slmkit.hookimpl, slmkit.positive, slmkit.OptionValueError, slmkit.ConfigError
        before = "torch" in sys.modules
        slmkit.HookPoint
        print(json.dumps({"before": before, "after": "torch" in sys.modules}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"before": False, "after": True}


# -- (d) the documented list is the API ----------------------------------------------------


def documented_api() -> list[str]:
    """The first-column names of the tables between the plugin-api markers."""
    text = WRITING_PLUGINS.read_text(encoding="utf-8")
    assert text.count(API_BEGIN) == 1 and text.count(API_END) == 1
    section = text[text.index(API_BEGIN) : text.index(API_END)]
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


def test_docs_list_exactly_the_api() -> None:
    documented = documented_api()
    duplicates = sorted({name for name in documented if documented.count(name) > 1})
    assert not duplicates, f"listed twice in docs/writing-plugins.md: {duplicates}"
    assert set(documented) == set(slmkit.__all__), (
        f"missing from the docs: {sorted(set(slmkit.__all__) - set(documented))}; "
        f"not in slmkit.__all__: {sorted(set(documented) - set(slmkit.__all__))}"
    )
