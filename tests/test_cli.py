"""The command line: exit codes, one-line errors, and what each command prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmkit.cli import main
from slmkit.runlog import read_events

ROOT = Path(__file__).resolve().parent.parent


def test_validate_prints_the_resolved_experiment_and_exact_parameter_count(capsys) -> None:
    assert main(["validate", str(ROOT / "experiments" / "baseline.toml")]) == 0
    out = capsys.readouterr().out
    assert "# parameters: 3,275,776 (3275776)" in out
    assert 'block = "gpt"' in out and "n_layers = 4" in out


def test_validate_applies_overrides(capsys) -> None:
    path = str(ROOT / "experiments" / "baseline.toml")
    assert main(["validate", path, "--set", "model.n_layers=2"]) == 0
    assert "n_layers = 2" in capsys.readouterr().out


def test_plugins_json_lists_builtins_with_components(capsys) -> None:
    assert main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert plugins["slmkit_builtin.char"]["provides"] == {"tokenizer": ["char"]}
    assert plugins["slmkit_builtin.gpt"]["hooks"] == ["register_blocks"]
    assert all(plugins[n]["builtin"] for n in plugins if n.startswith("slmkit_builtin."))
    assert set(plugins["slmkit_builtin.adamw"]) == {
        "name", "version", "builtin", "source", "hooks", "provides", "error",
    }  # fmt: skip


def test_plugins_table(capsys) -> None:
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "SOURCE", "PROVIDES", "HOOKS"]
    assert any(line.startswith("slmkit_builtin.corpora") and "corpus: file, python_docs" in line
               for line in lines)  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": {"n_layers": 3.9}}, "model.n_layers: expected an integer, got float 3.9"),
        ({"model": {"d_modle": 3}}, "model.d_modle: unknown key (did you mean 'd_model'?)"),
        ({"optimizer": {"name": "lion"}}, "optimizer.name: unknown optimizer 'lion'"),
        ({"data": {"corpus": "file", "path": "missing.txt"}},
         "data.path: no such file or folder: 'missing.txt'"),
        ({"data": {"corpus": "file", "path": "empty.txt"}}, "data: the corpus is empty"),
        ({"model": {"context_length": 100000}}, "data: the validation split has"),
    ],
)  # fmt: skip
def test_bad_experiments_exit_2_with_one_line_and_no_run_folder(
    write_experiment, tmp_path, monkeypatch, capsys, changes, message
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    path = write_experiment(changes)
    assert main(["run", str(path), "--runs-dir", "runs"]) == 2
    err = capsys.readouterr().err
    assert err == f"slmkit: error: {path}: {message}" + err.split(message, 1)[1]
    assert err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": {"corpus": "file", "path": "missing.txt"}},
         "data.path: no such file or folder: 'missing.txt'"),
        ({"data": {"corpus": "file", "path": "small.txt"}},
         "data: the validation split has 5 tokens, fewer than one window of context_length "
         "+ 1 = 33; use a larger corpus, a shorter model.context_length or another "
         "data.val_fraction"),
        ({"data": {"corpus": "file", "path": "binary.txt"}},
         "data.path: 'binary.txt' looks binary (it contains NUL bytes, the first at byte 20000)"),
        ({"forward_hooks": [{"name": "activation_stats", "points": ["blocks.*.hook_nothing"]}]},
         "forward_hooks.0.points: 'blocks.*.hook_nothing' matches no hook point of this model"),
        ({"training": {"precision": "fp16", "device": "cpu"}},
         'training.precision: "fp16" needs a CUDA device (this run is on cpu); use "bf16"'),
    ],
    ids=["missing-corpus", "corpus-too-small", "binary-corpus", "glob-matches-nothing", "fp16-cpu"],
)  # fmt: skip
def test_validate_refuses_what_run_refuses_with_the_same_line(
    write_experiment, tmp_path, monkeypatch, capsys, changes, message
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.txt").write_text("x" * 100)  # 95 + 5 characters: no validation window
    (tmp_path / "binary.txt").write_bytes(b"text " * 4000 + b"\x00")
    path = write_experiment(changes)
    assert main(["validate", str(path)]) == 2
    validate = capsys.readouterr()
    assert validate.out == ""
    assert validate.err.startswith(f"slmkit: error: {path}: {message}")
    assert validate.err.count("\n") == 1
    assert main(["run", str(path), "--runs-dir", "runs"]) == 2
    assert capsys.readouterr().err == validate.err
    assert not (tmp_path / "runs").exists()


def test_validate_refuses_a_runs_folder_that_cannot_hold_runs(
    write_experiment, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file, not a folder")
    path = write_experiment({"experiment": {"runs_dir": "taken/runs"}})
    assert main(["validate", str(path)]) == 2
    said = capsys.readouterr()
    assert said.out == "" and said.err == (
        f"slmkit: error: {path}: experiment.runs_dir: taken is not a folder; runs cannot be kept\n"
    )
    for options in ([], ["--sweep", "model.n_layers=1,2"]):  # a run refuses it before it builds
        assert main(["run", str(path), *options]) == 2
        assert capsys.readouterr().err == said.err
    assert main(["run", str(write_experiment()), "--runs-dir", "taken/x"]) == 2
    assert capsys.readouterr().err == (
        "slmkit: error: --runs-dir: taken is not a folder; runs cannot be kept\n"
    )
    assert (tmp_path / "taken").read_text() == "a file, not a folder"
    # a folder that does not exist yet is fine: the run makes it
    path = write_experiment({"experiment": {"runs_dir": "new/runs"}})
    assert main(["validate", str(path)]) == 0 and not (tmp_path / "new").exists()


def test_validate_reports_the_data_and_warns_of_unknown_characters(
    write_experiment, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "greek.txt").write_text("καλημέρα κόσμε " * 200, encoding="utf-8")
    path = write_experiment({"data": {"corpus": "file", "path": "greek.txt"}})
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert "# data: 3,000 characters, 2,850 training and 150 validation tokens\n" in captured.out
    assert captured.err.startswith(
        "slmkit: warning: 2,600 of the corpus's 3,000 tokens (86.7 %) are <UNK>, more than 2 %"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["greek.txt", path.name]  # no runs/


def test_errors_have_no_traceback_unless_debug(write_experiment, cli) -> None:
    path = write_experiment({"model": {"n_heads": 3}})
    done = cli("run", str(path))
    assert done.returncode == 2
    assert done.stderr == f"slmkit: error: {path}: model.n_heads: must divide d_model=32, got 3\n"
    debug = cli("--debug", "run", str(path))
    assert debug.returncode == 2 and "Traceback" in debug.stderr


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_run_sample_eval_end_to_end(write_experiment, tmp_path, capsys, precision) -> None:
    # eval recomputes the logged loss in the precision the run trained in
    training = {"max_steps": 2, "eval_every": 2, "precision": precision}
    path = write_experiment({"training": training})
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"finished {run_dir.name} at step 2" in out
    events = read_events(run_dir / "log.jsonl")
    assert [e["event"] for e in events] == [
        "run_start", "train_step", "train_step", "eval", "sample", "checkpoint", "run_end",
    ]  # fmt: skip

    args = ["sample", str(run_dir), "--prompt", "The ", "--max-new-tokens", "30", "--seed", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("The ") and len(first) == len("The ") + 30 + 1
    assert main([*args[:-1], "6"]) == 0
    assert capsys.readouterr().out != first

    assert main(["eval", str(run_dir / "checkpoints" / "latest.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    logged = next(e for e in events if e["event"] == "eval")
    assert result["step"] == 2
    assert result["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-9)


def test_sample_of_a_missing_run(tmp_path: Path, capsys) -> None:
    assert main(["sample", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint or run folder" in capsys.readouterr().err


def test_sample_rejects_bad_arguments(tmp_path: Path, capsys) -> None:
    assert main(["sample", str(tmp_path), "--temperature", "0"]) == 2
    assert capsys.readouterr().err == "slmkit: error: --temperature: must be > 0\n"


def test_python_dash_m_and_version(cli) -> None:
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("slmkit ")
