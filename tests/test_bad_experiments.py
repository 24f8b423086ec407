"""Malformed experiments, through the command line: each one line naming the file and the
key, exit code 2, no traceback, and no run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmkit.cli import main

#: (changes merged into the tiny experiment, the dotted key the error must name)
BAD: list[tuple[dict, str]] = [
    ({"model": {"n_layers": 3.9}}, "model.n_layers"),
    ({"model": {"n_layers": "4"}}, "model.n_layers"),
    ({"model": {"n_layers": True}}, "model.n_layers"),
    ({"model": {"n_layers": 0}}, "model.n_layers"),
    ({"model": {"d_model": -32}}, "model.d_model"),
    ({"model": {"n_heads": 3}}, "model.n_heads"),
    ({"model": {"dropout": 1.0}}, "model.dropout"),
    ({"model": {"dropout": -0.1}}, "model.dropout"),
    ({"model": {"n_layer": 4}}, "model.n_layer"),
    ({"model": {"attention": "flash"}}, "model.attention"),
    ({"model": {"block": "llama"}}, "model.block"),
    ({"model": {"init": "xavier"}}, "model.init"),
    ({"model": {"final_norm": "no"}}, "model.final_norm"),
    ({"model": 3}, "model"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
    ({"data": {"val_fraction": 0}}, "data.val_fraction"),
    ({"data": {"corpus": "wiki"}}, "data.corpus"),
    ({"data": {"corpus": "file", "path": "missing.txt"}}, "data.path"),
    ({"data": {"corpus": "file", "path": "empty.txt"}}, "data"),
    ({"data": {"corpus": "file", "path": "binary.bin"}}, "data.path"),
    ({"data": {"corpus": "file", "path": "latin1.txt"}}, "data.path"),
    ({"data": {"corpus": "file", "path": "no-texts"}}, "data.path"),
    ({"data": {"corpus": "file", "path": "tiny.txt"}}, "data"),
    ({"data": {"corpus": "python_docs", "path": "x.txt"}}, "data.path"),
    ({"tokenizer": {"name": "wordpiece"}}, "tokenizer.name"),
    ({"tokenizer": {"name": "bpe", "vocab_size": 100}}, "tokenizer.vocab_size"),
    ({"optimizer": {"learning_rate": -1.0}}, "optimizer.learning_rate"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas"),
    ({"optimizer": {"betas": "0.9"}}, "optimizer.betas"),
    ({"optimizer": {"name": "lion"}}, "optimizer.name"),
    ({"optimizer": {"weight_decay": "lots"}}, "optimizer.weight_decay"),
    ({"schedule": {"name": "cosine", "min_lr_ratio": 1.5}}, "schedule.min_lr_ratio"),
    ({"schedule": {"name": "cosine", "warmup_steps": 100}}, "schedule.warmup_steps"),
    ({"training": {"device": "tpu"}}, "training.device"),
    ({"training": {"batch_size": -2}}, "training.batch_size"),
    ({"training": {"max_step": 5}}, "training.max_step"),
    ({"training": {"on_nonfinite": "ignore"}}, "training.on_nonfinite"),
    ({"trainng": {}}, "trainng"),
    ({"plugins": {"enable": ["slmkit-nope"]}}, "plugins.enable"),
    ({"plugins": {"disable": ["slmkit_builtin.nope"]}}, "plugins.disable"),
    ({"forward_hooks": [{"name": "nope"}]}, "forward_hooks.0.name"),
    ({"forward_hooks": [{"name": "activation_stats", "near_zero": -1.0}]},
     "forward_hooks.0.near_zero"),
    ({"forward_hooks": [{"name": "activation_stats", "points": ["nope.*"]}]},
     "forward_hooks.0.points"),
    ({"update_hooks": {"name": "x"}}, "update_hooks"),
    ({"update_hooks": [{"name": "clip_grad_norm", "max_nrom": 1.0}]}, "update_hooks.0.max_nrom"),
    ({"sampling": {"temperature": 0}}, "sampling.temperature"),
    ({"experiment": {"seed": -1}}, "experiment.seed"),
    # NaN and the infinities are TOML floats, and every comparison lets NaN through
    ({"optimizer": {"learning_rate": float("nan")}}, "optimizer.learning_rate"),
    ({"optimizer": {"learning_rate": float("inf")}}, "optimizer.learning_rate"),
    ({"model": {"dropout": float("nan")}}, "model.dropout"),
    ({"data": {"val_fraction": float("-inf")}}, "data.val_fraction"),
    ({"sampling": {"top_p": float("nan")}}, "sampling.top_p"),
    ({"update_hooks": [{"name": "grad_noise", "eta": float("inf")}]}, "update_hooks.0.eta"),
]  # fmt: skip


@pytest.fixture
def corpora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "binary.bin").write_bytes(b"\x7fELF\x00\x01\x02" * 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "no-texts").mkdir()
    (tmp_path / "tiny.txt").write_text("just a few words, far less than one window\n")
    return tmp_path


def test_the_table_is_large_enough() -> None:
    assert len(BAD) >= 30


@pytest.mark.parametrize(("changes", "key"), BAD, ids=[k for _, k in BAD])
def test_a_bad_experiment_is_one_line_exit_2_and_no_run_folder(
    write_experiment, corpora, capsys, changes, key
) -> None:
    path = write_experiment(changes)
    assert main(["run", str(path), "--runs-dir", "runs"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"slmkit: error: {path}: {key}: "), captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert not (corpora / "runs").exists()


@pytest.mark.parametrize(
    ("text", "line"),
    [("[model]\nn_layers = = 4\n", 2), ("[model\n", 1), ('[model]\nblock = "gpt\n', 2),
     ("[model]\nn_layers = 4\nn_layers = 5\n", 3)],
)  # fmt: skip
def test_toml_syntax_errors_name_the_line(corpora, capsys, text: str, line: int) -> None:
    path = corpora / "broken.toml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slmkit: error: {path}: invalid TOML: ")
    assert f"line {line}" in err and err.count("\n") == 1
    assert not (corpora / "runs").exists()
