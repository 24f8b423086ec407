"""The floor carried through a run: eval events, floor.json, resume, runs, compare, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import events, train
from slmkit_builtin.markov import MarkovOptions, MarkovSource
from slmkit_builtin.synthetic import corpus_factory

from slmkit.compare import comparison_text, loss_curves_figure
from slmkit.config.resolve import load_experiment
from slmkit.errors import ConfigError
from slmkit.plugins import PluginManager
from slmkit.progress import Console, eval_line
from slmkit.runs import read_run
from slmkit.runs_table import runs_table

MARKOV = {"data": {"corpus": "markov", "size": 20_000, "alphabet": 4, "seed": 5}}


@pytest.fixture
def markov_run(write_experiment, tmp_path: Path, manager: PluginManager) -> Path:
    return train(write_experiment(MARKOV), tmp_path / "runs", manager)


def test_eval_events_log_the_floor_and_the_excess_per_character(markov_run: Path) -> None:
    source = MarkovSource(MarkovOptions(alphabet=4, seed=5))
    corpus = corpus_factory("markov", lambda _o: source)(
        MarkovOptions(size=20_000, alphabet=4, seed=5)
    )
    text = corpus.text()
    cut = int(len(text) * (1 - 0.05))
    expected = corpus.floor(text[cut:], 32, 4 * 2)  # batch_size x eval_batches windows
    assert json.loads((markov_run / "floor.json").read_text()) == expected.as_json()
    evals = events(markov_run, "eval")
    assert [e["step"] for e in evals] == [3, 6]
    for e in evals:
        assert e["val_floor"] == expected.val_loss
        assert e["val_excess"] == e["val_loss"] - expected.val_loss  # char: 1 char per token
    record = read_run(markov_run)
    assert record.val_floor == expected.val_loss
    assert record.last_val_excess == evals[-1]["val_excess"]
    assert record.floor_per_token == pytest.approx(expected.val_loss, rel=1e-12)


def test_a_resumed_run_reads_the_floor_from_the_run_folder(
    markov_run: Path, write_experiment, tmp_path: Path, manager: PluginManager
) -> None:
    cached = json.loads((markov_run / "floor.json").read_text())
    cached["val_loss"] = 1.25  # a value no computation gives: proves it was read, not computed
    (markov_run / "floor.json").write_text(json.dumps(cached))
    path = write_experiment(MARKOV)
    train(path, tmp_path / "runs", manager, overrides=["training.max_steps=9"], resume=markov_run)
    last = events(markov_run, "eval")[-1]
    assert last["step"] == 9 and last["val_floor"] == 1.25
    assert last["val_excess"] == last["val_loss"] - 1.25


def test_a_corpus_without_a_floor_logs_and_shows_nothing_extra(
    write_experiment, tmp_path: Path, manager: PluginManager, markov_run: Path
) -> None:
    plain = train(write_experiment(), tmp_path / "plain", manager)
    assert not (plain / "floor.json").exists()
    assert all("val_floor" not in e and "val_excess" not in e for e in events(plain, "eval"))
    assert "EXCESS" not in runs_table([read_run(plain)])
    both = [read_run(plain), read_run(markov_run)]
    header, plain_row, markov_row = runs_table(both).splitlines()[:3]
    assert header.split()[6:9] == ["BPC", "FLOOR", "EXCESS"]
    excess = read_run(markov_run).last_val_excess
    assert f"{excess:+.4f}" in markov_row and " -  " in plain_row
    assert f"{excess:+.4f}" in comparison_text(both)


def test_the_picture_draws_the_floor_as_a_dotted_line(markov_run: Path) -> None:
    pytest.importorskip("matplotlib")
    record = read_run(markov_run)
    figure = loss_curves_figure([record])
    by_step = figure.axes[0]
    floors = [line for line in by_step.lines if line.get_linestyle() == ":"]
    assert len(floors) == 1 and floors[0].get_ydata()[0] == pytest.approx(record.val_floor)
    assert "floor (dotted)" in figure._suptitle.get_text()


def test_require_floor_refuses_a_corpus_without_one_before_any_folder(
    write_experiment, tmp_path: Path, manager: PluginManager
) -> None:
    path = write_experiment({"data": {"require_floor": True}})
    with pytest.raises(ConfigError) as caught:
        train(path, tmp_path / "runs", manager)
    assert str(caught.value).startswith(f"{path}: data.require_floor: the 'python_docs' corpus")
    assert not (tmp_path / "runs").exists()
    exp = load_experiment(
        write_experiment({**MARKOV, "data": {**MARKOV["data"], "require_floor": True}}), manager
    )
    assert exp.data.require_floor is True


def test_the_progress_line_and_the_eval_line_show_the_excess() -> None:
    metrics = {"val_loss": 1.5, "val_bpc": 2.1640, "val_floor": 1.25, "val_excess": 0.25}
    assert eval_line(metrics) == (
        "val_loss 1.5000 (2.164 bits/char), +0.2500 nats/char above the floor 1.2500"
    )
    assert eval_line({"val_loss": 1.5, "val_bpc": 2.164}) == "val_loss 1.5000 (2.164 bits/char)"
    out = io.StringIO()
    console = Console(stream=out)
    console.progress(3, 6, 2.0, 100.0, 5.0, val_loss=1.5, val_excess=0.25)
    assert "| val 1.5000 (excess +0.2500 nats/char) |" in out.getvalue()
