"""The plugin manager and the component registry, with fresh managers and inline plugins."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import attrs
import pytest

import slmkit
from slmkit.errors import PluginError
from slmkit.plugins import DEFAULT_PLUGINS, PluginManager


def make_plugin(name: str, **hooks: object) -> types.ModuleType:
    """A module-like plugin object whose attributes are the given hook functions."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, slmkit.hookimpl(function))
    return module


def tokenizer_plugin(name: str, component: str = "mine") -> types.ModuleType:
    def register_tokenizers(register):
        register(component, lambda options: object())

    return make_plugin(name, register_tokenizers=register_tokenizers)


def bare_manager() -> PluginManager:
    return PluginManager(default_plugins=(), entry_points=False)


def test_builtins_provide_the_reference_components(manager: PluginManager) -> None:
    provided = {(c.kind, c.name): c.plugin for c in manager.registry.components()}
    assert provided == {
        ("tokenizer", "char"): "slmkit_builtin.char",
        ("tokenizer", "bpe"): "slmkit_builtin.bpe",
        ("block", "gpt"): "slmkit_builtin.gpt",
        ("optimizer", "adamw"): "slmkit_builtin.adamw",
        ("optimizer", "muon"): "slmkit_builtin.muon",
        ("schedule", "constant"): "slmkit_builtin.constant",
        ("schedule", "cosine"): "slmkit_builtin.schedules",
        ("schedule", "linear"): "slmkit_builtin.schedules",
        ("schedule", "wsd"): "slmkit_builtin.schedules",
        ("corpus", "file"): "slmkit_builtin.corpora",
        ("corpus", "python_docs"): "slmkit_builtin.corpora",
        ("corpus", "markov"): "slmkit_builtin.synthetic",
        ("corpus", "hmm"): "slmkit_builtin.synthetic",
        ("corpus", "induction"): "slmkit_builtin.synthetic",
        ("corpus", "regular"): "slmkit_builtin.synthetic",
        ("forward_hook", "activation_stats"): "slmkit_builtin.forward_hooks",
        ("forward_hook", "attention_entropy"): "slmkit_builtin.forward_hooks",
        ("forward_hook", "capture"): "slmkit_builtin.forward_hooks",
        ("update_hook", "clip_grad_norm"): "slmkit_builtin.update_hooks",
        ("update_hook", "grad_stats"): "slmkit_builtin.update_hooks",
        ("update_hook", "grad_noise"): "slmkit_builtin.update_hooks",
        ("update_hook", "grokfast"): "slmkit_builtin.update_hooks",
        ("probe", "induction"): "slmkit_builtin.probes",
        ("probe", "previous_token"): "slmkit_builtin.probes",
        ("probe", "logit_lens"): "slmkit_builtin.probes",
        ("probe", "attention_entropy"): "slmkit_builtin.probes",
        ("tracker", "tensorboard"): "slmkit_builtin.tensorboard",
        ("tracker", "trackio"): "slmkit_builtin.trackio",
    }
    assert [p.name for p in manager.all_plugins()] == list(DEFAULT_PLUGINS)
    assert all(p.builtin and not p.broken for p in manager.all_plugins())


def test_load_is_idempotent(manager: PluginManager) -> None:
    before = manager.registry.components()
    manager.load()
    assert manager.registry.components() == before


def test_inline_plugin_registers_a_component() -> None:
    pm = bare_manager()
    info = pm.add(tokenizer_plugin("mine-plugin"), "mine-plugin", version="1.2")
    assert info.provides == {"tokenizer": ["mine"]}
    assert info.hooks == ["register_tokenizers"]
    assert pm.component("tokenizer", "mine", ["mine-plugin"]).plugin == "mine-plugin"


def test_a_plugin_that_fails_to_import_is_recorded_and_the_rest_load() -> None:
    pm = PluginManager(
        default_plugins=("slmkit_builtin.char", "no_such_module_xyz"), entry_points=False
    ).load()
    broken = pm.plugins["no_such_module_xyz"]
    assert broken.broken
    assert "import failed: ModuleNotFoundError" in broken.error
    assert pm.component("tokenizer", "char", pm.participants()).name == "char"


def test_a_registration_hook_that_raises_marks_the_plugin_broken_and_keeps_nothing() -> None:
    def register_tokenizers(register):
        register("half", lambda options: None)
        raise RuntimeError("boom")

    pm = bare_manager()
    info = pm.add(make_plugin("bad", register_tokenizers=register_tokenizers), "bad")
    assert info.broken and "RuntimeError: boom" in info.error
    assert pm.registry.components() == []
    assert pm.pm.get_plugin("bad") is None


def test_a_misspelt_hook_is_reported_with_a_suggestion() -> None:
    def register_tokenizer(register):  # missing the final "s"
        pass

    pm = bare_manager()
    info = pm.add(make_plugin("typo", register_tokenizer=register_tokenizer), "typo")
    assert info.error == "unknown hook 'register_tokenizer' (did you mean 'register_tokenizers'?)"
    pm.pm.check_pending()  # the broken plugin was unregistered: nothing is left pending


def test_options_must_be_an_attrs_class() -> None:
    class NotAttrs:
        pass

    def register_tokenizers(register):
        register("x", lambda options: None, options=NotAttrs)

    pm = bare_manager()
    info = pm.add(make_plugin("p", register_tokenizers=register_tokenizers), "p")
    assert "options must be an attrs class" in info.error


def test_two_participants_registering_one_name_is_an_error_naming_both() -> None:
    pm = bare_manager()
    pm.add(tokenizer_plugin("first", "same"), "first")
    pm.add(tokenizer_plugin("second", "same"), "second")
    with pytest.raises(PluginError, match="'same' is registered by both 'first' and 'second'"):
        pm.component("tokenizer", "same", ["first", "second"])
    assert pm.component("tokenizer", "same", ["second"]).plugin == "second"
    assert [[c.plugin for c in group] for group in pm.registry.conflicts()] == [["first", "second"]]


def test_a_component_of_a_plugin_not_enabled_says_which_entry_to_add(manager) -> None:
    manager.add(tokenizer_plugin("slmkit-wordpiece", "wordpiece"), "slmkit-wordpiece")
    with pytest.raises(PluginError, match=r'add it to \[plugins\] enable = \["slmkit-wordpiece"\]'):
        manager.component("tokenizer", "wordpiece", manager.participants())


def test_unknown_component_suggests_a_close_name(manager: PluginManager) -> None:
    with pytest.raises(PluginError, match=r"unknown tokenizer 'chr' \(did you mean 'char'\?\)"):
        manager.component("tokenizer", "chr", manager.participants())


def test_unknown_component_mentions_broken_plugins() -> None:
    pm = PluginManager(default_plugins=("slmkit_builtin.char", "broken_xyz"), entry_points=False)
    with pytest.raises(PluginError, match="broken plugins that may provide it: 'broken_xyz'"):
        pm.load().component("tokenizer", "bpe", pm.participants())


def test_participants_builtins_minus_disabled_plus_enabled(manager: PluginManager) -> None:
    manager.add(tokenizer_plugin("extra"), "extra")
    assert manager.participants() == list(DEFAULT_PLUGINS)
    chosen = manager.participants(enable=["extra"], disable=["slmkit_builtin.adamw"])
    assert "slmkit_builtin.adamw" not in chosen and chosen[-1] == "extra"


@pytest.mark.parametrize(
    ("enable", "disable", "message"),
    [
        (["nope"], [], "plugin 'nope' is not installed"),
        ([], ["nope"], "'nope' is not a built-in plugin"),
    ],
)
def test_participants_errors(manager, enable, disable, message) -> None:
    with pytest.raises(PluginError, match=message):
        manager.participants(enable=enable, disable=disable)


def test_enabling_a_broken_plugin_fails_naming_it() -> None:
    pm = bare_manager()
    pm.add(make_plugin("bad", register_tokenizer=lambda register: None), "bad")
    with pytest.raises(PluginError, match="plugins.enable: plugin 'bad' is broken: unknown hook"):
        pm.participants(enable=["bad"])


def test_run_events_reach_only_participants() -> None:
    calls = []

    def on_run_end(run, summary):
        calls.append(summary)

    pm = bare_manager()
    pm.add(make_plugin("in", on_run_end=on_run_end), "in")
    pm.add(make_plugin("out", on_run_end=lambda run, summary: calls.append("out")), "out")
    pm.hook_caller("on_run_end", ["in"])(run=None, summary="s")
    assert calls == ["s"]


def fake_distribution(root: Path, dist: str, module: str, source: str) -> None:
    """An installed distribution (dist-info + module) providing one slmkit entry point."""
    info = root / f"{dist.replace('-', '_')}-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[slmkit]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(source)


GOOD_PLUGIN = """
import slmkit

@slmkit.hookimpl
def register_optimizers(register):
    register("fake_opt", lambda options, groups: None)
"""


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    fake_distribution(tmp_path, "slmkit-good", "slmkit_good_xyz", GOOD_PLUGIN)
    fake_distribution(tmp_path, "slmkit-broken", "slmkit_broken_xyz", "raise ImportError('no')")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("slmkit_good_xyz", "slmkit_broken_xyz"):
        sys.modules.pop(name, None)


def test_entry_points_load_one_at_a_time(installed: Path) -> None:
    pm = PluginManager(default_plugins=(), environ={}).load()
    good, broken = pm.plugins["slmkit-good"], pm.plugins["slmkit-broken"]
    assert (good.version, good.builtin, good.provides) == (
        "0.3",
        False,
        {"optimizer": ["fake_opt"]},
    )
    assert good.source == "entry point slmkit:slmkit_good_xyz"
    assert broken.broken and "ImportError: no" in broken.error
    assert pm.component("optimizer", "fake_opt", pm.participants(enable=["slmkit-good"]))


@pytest.mark.parametrize(
    ("value", "loaded"),
    [("", set()), ("slmkit-good", {"slmkit-good"}), ("slmkit-good, slmkit-broken", None)],
)
def test_load_plugins_env_limits_entry_points(installed: Path, value: str, loaded) -> None:
    pm = PluginManager(default_plugins=(), environ={"SLMKIT_LOAD_PLUGINS": value}).load()
    names = {p.name for p in pm.all_plugins()} & {"slmkit-good", "slmkit-broken"}
    assert names == (loaded if loaded is not None else {"slmkit-good", "slmkit-broken"})


def test_as_json_shape(manager: PluginManager) -> None:
    info = manager.plugins["slmkit_builtin.corpora"].as_json()
    assert info == {
        "name": "slmkit_builtin.corpora",
        "version": slmkit.__version__,
        "builtin": True,
        "source": "builtin",
        "hooks": ["register_corpora"],
        "provides": {"corpus": ["file", "python_docs"]},
        "error": None,
    }


def test_component_options_class_is_used(manager: PluginManager) -> None:
    adamw = manager.component("optimizer", "adamw", manager.participants())
    assert attrs.asdict(adamw.build_options())["weight_decay"] == 0.1


EXITS_WHILE_REGISTERING = """
import slmkit

@slmkit.hookimpl
def register_tokenizers(register):
    register("exit_tok", lambda options: None)
    raise SystemExit(3)
"""

# pluggy lists the plugin's attributes while registering it: this one raises Ctrl-C then
INTERRUPTS_PLUGGY = """
def __dir__():
    raise KeyboardInterrupt
"""


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Installed plugins raising SystemExit and KeyboardInterrupt while they register."""
    fake_distribution(tmp_path, "slmkit-exits", "slmkit_exits_xyz", EXITS_WHILE_REGISTERING)
    fake_distribution(tmp_path, "slmkit-interrupts", "slmkit_interrupts_xyz", INTERRUPTS_PLUGGY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SLMKIT_LOAD_PLUGINS", raising=False)
    yield tmp_path
    for name in ("slmkit_exits_xyz", "slmkit_interrupts_xyz"):
        sys.modules.pop(name, None)


def test_base_exceptions_while_registering_mark_the_plugin_broken(hostile: Path) -> None:
    pm = PluginManager(default_plugins=("slmkit_builtin.char",), environ={}).load()
    exits, interrupts = pm.plugins["slmkit-exits"], pm.plugins["slmkit-interrupts"]
    assert exits.error is not None
    assert exits.error.startswith("registering components failed: SystemExit: 3 (at ")
    assert interrupts.error is not None
    assert interrupts.error.startswith("registration failed: KeyboardInterrupt")
    # nothing of either is left behind, and the rest works
    assert pm.pm.get_plugin("slmkit-exits") is None
    assert pm.pm.get_plugin("slmkit-interrupts") is None
    assert [c.name for c in pm.registry.components()] == ["char"]
    assert pm.participants() == ["slmkit_builtin.char"]


def test_every_command_works_beside_a_plugin_that_raises_system_exit(
    hostile: Path, write_experiment, tmp_path: Path, capsys
) -> None:
    from slmkit.cli import main

    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p["error"] for p in json.loads(capsys.readouterr().out)}
    assert listed["slmkit-exits"].startswith("registering components failed: SystemExit: 3")
    assert listed["slmkit_builtin.char"] is None
    assert main(["plugins"]) == 0
    assert "BROKEN: registering components failed: SystemExit: 3" in capsys.readouterr().out
    path = write_experiment({"training": {"max_steps": 1}, "sampling": {"every": 0}})
    assert main(["validate", str(path)]) == 0
    assert "# parameters: " in capsys.readouterr().out
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    assert " at step 1: val_loss " in capsys.readouterr().out
    assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)] == ["finished"]
