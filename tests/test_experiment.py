"""Experiment files: strict structuring, errors naming file and key, overrides, dump/load."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmkit.config.diff import NOT_HASHED, changed_keys, config_hash
from slmkit.config.reading import apply_overrides, parse_override
from slmkit.config.resolve import experiment_from_dict, load_experiment
from slmkit.errors import ConfigError
from slmkit.plugins import PluginManager
from slmkit.state import RESUMABLE_CHANGES

ROOT = Path(__file__).resolve().parent.parent


def test_baseline_is_the_reference_configuration(manager: PluginManager) -> None:
    exp = load_experiment(ROOT / "experiments" / "baseline.toml", manager)
    m, o, t = exp.model, exp.optimizer, exp.training
    assert (m.block, m.n_layers, m.d_model, m.n_heads, m.d_ff) == ("gpt", 4, 256, 4, 1024)
    assert (m.dropout, m.context_length) == (0.1, 256)
    assert (o.name, o.learning_rate, o.options.weight_decay, o.options.betas) == (
        "adamw", 3e-4, 0.1, [0.9, 0.95]
    )  # fmt: skip
    assert (t.batch_size, t.max_steps, t.eval_every) == (16, 2000, 200)
    assert (exp.tokenizer.name, exp.data.corpus, exp.data.val_fraction) == (
        "char", "python_docs", 0.05
    )  # fmt: skip


def test_quick_has_the_same_tables_as_baseline() -> None:
    def tables(name: str) -> dict[str, set[str]]:
        data = tomllib.loads((ROOT / "experiments" / name).read_text())
        return {table: set(values) for table, values in data.items()}

    assert tables("quick.toml") == tables("baseline.toml")


def test_an_empty_experiment_gets_every_default(manager: PluginManager) -> None:
    exp = experiment_from_dict({}, manager, "empty.toml")
    assert exp.to_dict() == load_experiment(
        ROOT / "experiments/baseline.toml", manager
    ).to_dict() | {"experiment": {"name": "experiment", "seed": 1337, "runs_dir": "runs"}}


def test_dump_and_load_round_trip(manager: PluginManager, tmp_path: Path) -> None:
    exp = load_experiment(ROOT / "experiments" / "quick.toml", manager)
    path = tmp_path / "resolved.toml"
    path.write_text(exp.to_toml())
    again = load_experiment(path, manager)
    assert again == exp
    assert again.config_hash == exp.config_hash


def test_arrays_of_tables_are_written_as_blocks_after_the_tables(
    manager: PluginManager, tmp_path: Path
) -> None:
    exp = experiment_from_dict({
        "forward_hooks": [{"name": "activation_stats", "points": ["blocks.0.hook_resid_post"]},
                          {"name": "capture", "enabled": False}],
        "probes": [{"name": "induction", "every": 2}],
    }, manager, "x.toml")  # fmt: skip
    text = exp.to_toml()
    assert "{" not in text  # no inline tables
    headers = [line for line in text.splitlines() if line.startswith("[")]
    assert headers[-3:] == ["[[forward_hooks]]", "[[forward_hooks]]", "[[probes]]"]
    assert '[[forward_hooks]]\nname = "activation_stats"\nenabled = true\n' in text
    (tmp_path / "resolved.toml").write_text(text)
    assert load_experiment(tmp_path / "resolved.toml", manager) == exp


@settings(max_examples=40, deadline=None)
@given(
    n_heads=st.sampled_from([1, 2, 4, 8]),
    head_width=st.integers(1, 64),
    n_layers=st.integers(1, 48),
    lr=st.floats(1e-6, 1.0),
    dropout=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**31),
    name=st.text(min_size=1, max_size=20),
    prompt=st.text(max_size=20),
    hooks=st.lists(st.booleans(), max_size=0),
)
def test_dump_load_round_trip_property(
    n_heads, head_width, n_layers, lr, dropout, seed, name, prompt, hooks
) -> None:
    manager = PluginManager(entry_points=False).load()
    data = {
        "experiment": {"name": name, "seed": seed},
        "model": {"n_heads": n_heads, "d_model": n_heads * head_width, "n_layers": n_layers,
                  "dropout": dropout},
        "optimizer": {"learning_rate": lr},
        "sampling": {"prompt": prompt},
    }  # fmt: skip
    exp = experiment_from_dict(data, manager, "x.toml")
    again = experiment_from_dict(tomllib.loads(exp.to_toml()), manager, "resolved.toml")
    assert again == exp
    assert again.config_hash == exp.config_hash


def test_config_hash_changes_with_any_value(manager: PluginManager) -> None:
    a = experiment_from_dict({}, manager, "a")
    b = experiment_from_dict({"optimizer": {"weight_decay": 0.2}}, manager, "b")
    assert a.config_hash != b.config_hash
    assert len(a.config_hash) == 64


def test_config_hash_leaves_out_the_length_and_the_threads(manager: PluginManager) -> None:
    # the keys a resume may change: a run resumed to train longer keeps its hash
    a = experiment_from_dict({}, manager, "a")
    b = experiment_from_dict({"training": {"max_steps": 7, "threads": 3}}, manager, "b")
    c = experiment_from_dict({"training": {"eval_every": 7}}, manager, "c")
    d = experiment_from_dict({"training": {"max_flops": 1e12}}, manager, "d")
    assert a.config_hash == b.config_hash == d.config_hash != c.config_hash
    assert RESUMABLE_CHANGES == NOT_HASHED == (
        "training.max_steps", "training.max_flops", "training.threads", "trackers")  # fmt: skip
    # the same hash from the experiment.toml a run writes, read back without the plugins
    assert config_hash(tomllib.loads(b.to_toml())) == a.config_hash


ERRORS = [
    ({"model": {"n_layers": 3.9}}, "model.n_layers: expected an integer, got float 3.9"),
    ({"model": {"n_layers": "4"}}, "model.n_layers: expected an integer, got string '4'"),
    ({"model": {"n_layers": True}}, "model.n_layers: expected an integer, got boolean True"),
    ({"model": {"n_layers": 0}}, "model.n_layers: must be > 0, got 0"),
    ({"model": {"n_heads": 3}}, "model.n_heads: must divide d_model=256, got 3"),
    ({"model": {"dropout": 1.0}}, "model.dropout: must be in [0, 1), got 1.0"),
    ({"model": {"n_layer": 4}}, "model.n_layer: unknown key (did you mean 'n_layers'?)"),
    ({"model": {"attention": "flash"}}, "model.attention: must be one of 'sdpa', 'explicit'"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction: must be in (0, 1), got 1.5"),
    ({"optimizer": {"learning_rate": -1.0}}, "optimizer.learning_rate: must be > 0, got -1.0"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas: expected two numbers"),
    ({"optimizer": {"betas": "0.9"}}, "optimizer.betas: expected an array, got string"),
    ({"optimizer": {"betas": [0.9, "x"]}}, "optimizer.betas.1: expected a number, got string"),
    ({"tokenizer": {"name": "wordpiece"}}, "tokenizer.name: unknown tokenizer 'wordpiece'"),
    ({"model": {"block": "llama"}}, "model.block: unknown block 'llama'"),
    ({"data": {"corpus": "wiki"}}, "data.corpus: unknown corpus 'wiki'"),
    ({"training": {"device": "tpu"}}, "training.device: must be one of 'auto', 'cpu'"),
    ({"training": {"batch_size": -2}}, "training.batch_size: must be > 0, got -2"),
    ({"training": {"max_step": 5}}, "training.max_step: unknown key (did you mean 'max_steps'?)"),
    ({"trainng": {}}, "trainng: unknown table (did you mean 'training'?)"),
    ({"model": 3}, "model: expected a table, got integer"),
    ({"plugins": {"enable": ["slmkit-nope"]}}, "plugins.enable: plugin 'slmkit-nope' is not"),
    ({"plugins": {"enable": "slmkit-nope"}}, "plugins.enable: expected an array, got string"),
    ({"forward_hooks": [{"name": "nope"}]}, "forward_hooks.0.name: unknown forward hook 'nope'"),
    ({"update_hooks": {"name": "x"}}, "update_hooks: expected an array of tables"),
    ({"sampling": {"temperature": 0}}, "sampling.temperature: must be > 0, got 0.0"),
    ({"experiment": {"seed": -1}}, "experiment.seed: must be >= 0, got -1"),
]


@pytest.mark.parametrize(("data", "message"), ERRORS, ids=[m.split(":")[0] for _, m in ERRORS])
def test_errors_name_the_file_and_the_key(manager: PluginManager, data, message) -> None:
    with pytest.raises(ConfigError) as caught:
        experiment_from_dict(data, manager, "experiments/x.toml")
    text = str(caught.value)
    assert text.startswith(f"experiments/x.toml: {message}"), text
    assert "\n" not in text


def test_toml_syntax_error_names_the_line(manager: PluginManager, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nn_layers = 4\nd_model = = 2\n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML: .*line 3"):
        load_experiment(path, manager)


def test_missing_file(manager: PluginManager, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_experiment(tmp_path / "nope.toml", manager)


def test_overrides_use_dotted_keys_and_toml_values(manager: PluginManager) -> None:
    exp = experiment_from_dict(
        apply_overrides({}, ["model.n_layers=6", "optimizer.betas=[0.8, 0.9]",
                             "data.corpus=file", "data.path=../some dir/x.txt"]),
        manager, "x.toml",
    )  # fmt: skip
    assert exp.model.n_layers == 6
    assert exp.optimizer.options.betas == [0.8, 0.9]
    assert exp.data.options.path == "../some dir/x.txt"  # not TOML: taken as a string


def test_override_keeps_strict_types(manager: PluginManager) -> None:
    with pytest.raises(ConfigError, match="model.n_layers: expected an integer, got float 6.5"):
        experiment_from_dict(apply_overrides({}, ["model.n_layers=6.5"]), manager, "x.toml")


@pytest.mark.parametrize("text", ["model.n_layers", "=3", "model..x=1"])
def test_malformed_override(text: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


def test_override_into_an_array_of_tables() -> None:
    data = {"update_hooks": [{"name": "a", "x": 1}]}
    assert apply_overrides(data, ["update_hooks.0.x=2"])["update_hooks"][0]["x"] == 2
    with pytest.raises(ConfigError, match="no such array entry"):
        apply_overrides(data, ["update_hooks.3.x=2"])


def test_changed_keys() -> None:
    old = {"model": {"n_layers": 4, "d_model": 256}, "hooks": [{"name": "a"}]}
    new = {"model": {"n_layers": 6, "d_model": 256}, "hooks": [{"name": "b"}], "x": {"y": 1}}
    assert changed_keys(old, new) == ["hooks.0.name", "model.n_layers", "x.y"]
