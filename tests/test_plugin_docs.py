"""The plugin author's pages (docs/writing-plugins.md, docs/hooks.md) against the code.

Every ``slmkit.X`` (and ``slmkit.testing.X``) they mention must exist; the constructors
and helper signatures they show must be the real ones; the kinds of ``provides`` must be
the kinds table's; and their links to headings must land.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import slmkit
import slmkit.testing
from slmkit import kinds
from slmkit.plugins import PluginInfo

ROOT = Path(__file__).resolve().parent.parent
WRITING_PLUGINS = ROOT / "docs" / "writing-plugins.md"
HOOKS = ROOT / "docs" / "hooks.md"
PAGES = [WRITING_PLUGINS, HOOKS, ROOT / "plugins" / "slmkit-sgd-momentum" / "README.md"]


def resolve(dotted: str) -> Any:
    """The object ``slmkit.a.b`` names: attributes, or submodules where there are none."""
    parts = dotted.split(".")
    value: Any = slmkit
    for i, part in enumerate(parts[1:], 1):
        if hasattr(value, part):
            value = getattr(value, part)
        else:
            value = importlib.import_module(".".join(parts[: i + 1]))
    return value


def mentioned_names(text: str) -> set[str]:
    """Every ``slmkit.name[.name]`` in ``text`` (not ``slmkit_builtin``, not file paths)."""
    return set(re.findall(r"(?<![\w/.-])(slmkit(?:\.[A-Za-z_]\w*)+)", text))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_slmkit_name_the_plugin_pages_mention_exists(page: Path) -> None:
    names = mentioned_names(page.read_text(encoding="utf-8"))
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (AttributeError, ModuleNotFoundError):
            missing.append(name)
    assert not missing, f"{page.name} mentions names slmkit does not have: {missing}"


def test_the_checker_finds_the_names() -> None:
    text = "use `slmkit.testing.tiny_model(...)`, slmkit.Run, `slmkit/train.py`, slmkit_builtin.x"
    assert mentioned_names(text) == {"slmkit.testing.tiny_model", "slmkit.Run"}
    with pytest.raises(ModuleNotFoundError):
        resolve("slmkit.testing.no_such_helper")


# -- signatures ------------------------------------------------------------------------------


def documented_signature(text: str, call: str) -> tuple[list[tuple[str, str, Any]], str]:
    """``[(parameter, kind, default)]`` of the first ``call(...)`` documented in ``text``."""
    match = re.search(rf"`{re.escape(call)}(\([^`]*\))`", text)
    assert match, f"no `{call}(...)` in the docs"
    function = ast.parse(f"def f{match.group(1)}: pass").body[0]
    assert isinstance(function, ast.FunctionDef)
    args = function.args
    positional = [(a.arg, "positional") for a in args.args]
    defaults: list[Any] = [inspect.Parameter.empty] * (len(positional) - len(args.defaults))
    defaults += [ast.literal_eval(d) for d in args.defaults]
    params = [
        (name, kind, default) for (name, kind), default in zip(positional, defaults, strict=True)
    ]
    for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        params.append(
            (a.arg, "keyword", inspect.Parameter.empty if d is None else ast.literal_eval(d))
        )
    return params, match.group(1)


def real_signature(obj: Any) -> list[tuple[str, str, Any]]:
    kind = {inspect.Parameter.KEYWORD_ONLY: "keyword"}
    return [
        (p.name, kind.get(p.kind, "positional"), p.default)
        for p in inspect.signature(obj).parameters.values()
    ]


@pytest.mark.parametrize(
    "call",
    [
        "ModelDims",
        "BlockContext",
        "KVCache",
        "ProbeSetup",
        "slmkit.testing.load_plugin",
        "slmkit.testing.tiny_model",
        "slmkit.testing.train_tiny",
        "slmkit.testing.check_kv_cache",
    ],
)
def test_documented_constructors_and_helpers_are_the_real_signatures(call: str) -> None:
    documented, shown = documented_signature(WRITING_PLUGINS.read_text(encoding="utf-8"), call)
    target = resolve(call if call.startswith("slmkit.") else f"slmkit.{call}")
    assert documented == real_signature(target), f"docs show {call}{shown}"


def test_the_example_of_calling_a_block_by_hand_runs() -> None:
    text = WRITING_PLUGINS.read_text(encoding="utf-8")
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "ModelDims(" in c]
    from slmkit_builtin.gpt import GPTBlock, GPTOptions

    scope: dict[str, Any] = {"slmkit": slmkit, "torch": torch}
    scope |= {"MyBlock": GPTBlock, "MyOptions": GPTOptions}
    exec(code, scope)
    assert scope["dims"].d_head == 8
    assert scope["y"].shape == (2, 1, 32)
    assert scope["cache"].length == 1


def test_the_documented_cache_tolerance_is_the_default() -> None:
    text = WRITING_PLUGINS.read_text(encoding="utf-8")
    assert slmkit.testing.DEFAULT_ATOL == 1e-5 and slmkit.testing.DEFAULT_RTOL == 0.0
    assert "`slmkit.testing.DEFAULT_ATOL`\n(1e-5, `rtol` 0)" in text
    parameters = inspect.signature(slmkit.testing.check_kv_cache).parameters
    assert parameters["atol"].default == slmkit.testing.DEFAULT_ATOL
    assert parameters["rtol"].default == slmkit.testing.DEFAULT_RTOL


def test_the_tiny_model_the_docs_describe() -> None:
    text = WRITING_PLUGINS.read_text(encoding="utf-8")
    assert (
        "2 layers, `d_model` 32, 4 heads, `d_ff` 64, no dropout, context 32" in text
    )  # slmkit.testing.TINY_MODEL
    assert slmkit.testing.TINY_MODEL == {
        "n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "dropout": 0.0,
        "context_length": 32,
    }  # fmt: skip


# -- slmkit plugins --json -----------------------------------------------------------------------


def test_the_provides_keys_are_the_kinds() -> None:
    text = WRITING_PLUGINS.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| `(register_\w+)` \| `\[\[?(\w+)\]?\] (\w+)` \|$", text, re.M)
    assert rows == [(k.name, k.hook, k.table, k.name_key) for k in kinds.KINDS]


def test_the_documented_json_entry_has_the_fields_of_slmkit_plugins() -> None:
    text = WRITING_PLUGINS.read_text(encoding="utf-8")
    block = re.search(r"```json\n(\{.*?\})\n```", text, re.S)
    assert block
    documented = json.loads(block.group(1))
    real = PluginInfo("slmkit-lion", "0.1.0", False, "entry point slmkit:lion").as_json()
    assert list(documented) == list(real)


# -- links to headings -----------------------------------------------------------------------


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of ``page``."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_to_headings_land(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        linked = (page.parent / target).resolve() if target else page
        if "://" in target or linked.suffix != ".md":
            continue
        if anchor not in anchors(linked):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{page.name} links to headings that do not exist: {broken}"
