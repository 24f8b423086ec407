"""Trackers: the [[trackers]] kind, what they record of a run's events, TensorBoard,
trackio, `slmkit export`, and a failing tracker that never stops the run."""

from __future__ import annotations

import io
import math
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from conftest import ROOT, TINY, events, train

import slmkit
from slmkit.cli import main
from slmkit.config.resolve import experiment_from_dict, load_experiment
from slmkit.errors import ConfigError
from slmkit.plugins import PluginManager
from slmkit.progress import Console
from slmkit.run_segments import kept_events
from slmkit.runlog import read_events
from slmkit.train import Trainer

TENSORBOARD = {"trackers": [{"name": "tensorboard"}]}
BOTH = {"trackers": [{"name": "tensorboard"}, {"name": "trackio"}]}


# -- what trackers record of an event ------------------------------------------------------


def test_tracked_values_of_each_kind_of_event() -> None:
    def values(event: dict[str, Any]) -> slmkit.TrackedValues | None:
        return slmkit.tracked_values({"run_id": "r", "timestamp": "t", **event})

    step = values({"event": "train_step", "step": 4, "train_loss": 2.5, "lr": 1e-3,
                   "tokens_per_s": 900.0})  # fmt: skip
    assert step == slmkit.TrackedValues(
        4, scalars={"train/loss": 2.5, "train/lr": 1e-3, "train/tokens_per_s": 900.0}
    )
    evaluation = values({"event": "eval", "step": 6, "val_loss": 2.0, "val_bpc": 2.9,
                         "val_floor": 1.1, "val_excess": 0.3})  # fmt: skip
    assert evaluation is not None and evaluation.scalars == {
        "val/loss": 2.0, "val/bpc": 2.9, "val/floor": 1.1, "val/excess": 0.3}  # fmt: skip
    # a NaN loss is logged as null and named in `nonfinite`: recorded as NaN again
    diverged = values({"event": "train_step", "step": 5, "train_loss": None, "lr": 0.1,
                       "tokens_per_s": 1.0, "nonfinite": {"train_loss": "nan"}})  # fmt: skip
    assert diverged is not None and math.isnan(diverged.scalars["train/loss"])
    hook = values({"event": "forward_hook", "name": "attention_entropy", "phase": "train",
                   "step": 2, "metrics": {"blocks.0.attn.hook_pattern": [1.5, None, 0.5]},
                   "nonfinite": {"metrics.blocks.0.attn.hook_pattern.1": "inf"}})  # fmt: skip
    # lists of numbers are histograms of their finite values
    assert hook == slmkit.TrackedValues(
        2,
        histograms={"forward_hook/attention_entropy/train/blocks.0.attn.hook_pattern": [1.5, 0.5]},
    )
    probe = values({"event": "probe", "step": 6, "probe": "induction", "plugin": "p",
                    "metrics": {"loss_drop": 0.25, "score": [[0.1, 0.2], [0.3, 0.4]]}})  # fmt: skip
    assert probe == slmkit.TrackedValues(
        6, scalars={"probe/induction/loss_drop": 0.25},
        histograms={"probe/induction/score": [0.1, 0.2, 0.3, 0.4]},
    )  # fmt: skip
    update = values({"event": "update_hook", "name": "clip_grad_norm", "step": 3,
                     "metrics": {"grad_norm": 1.25, "clipped": True}})  # fmt: skip
    assert update == slmkit.TrackedValues(3, scalars={"update_hook/clip_grad_norm/grad_norm": 1.25})
    sample = values({"event": "sample", "step": 3, "prompt": "\n", "sample_text": "a*b\n# c"})
    assert sample == slmkit.TrackedValues(3, texts={"sample": "    \n    a*b\n    # c"})
    # when the event was logged comes along (a replay or an export keeps it)
    logged = slmkit.tracked_values({"event": "eval", "step": 2, "val_loss": 1.0,
                                    "timestamp": "2026-12-01T22:07:50.5Z"})  # fmt: skip
    assert logged is not None and logged.time == 1796162870.5
    mine = values({"event": "my_plugin", "step": 7, "count": 3, "label": "x"})
    assert mine == slmkit.TrackedValues(7, scalars={"my_plugin/count": 3.0})
    end = values({"event": "run_end", "summary": {"steps": 6, "train_loss": 2.1, "val_loss": 2.2,
                  "best_val_loss": 2.0, "val_bpc": 3.0, "elapsed_s": 9.0}})  # fmt: skip
    assert end == slmkit.TrackedValues(6, final=True, scalars={
        "final/train_loss": 2.1, "final/val_loss": 2.2, "final/best_val_loss": 2.0,
        "final/val_bpc": 3.0})  # fmt: skip
    assert values({"event": "run_start", "resumed_from_step": None}) is None
    assert values({"event": "checkpoint", "step": 3, "path": "checkpoints/step_3.pt"}) is None
    # what a store holds at a step or later is left out
    assert step.unrecorded({"train/loss": 4, "train/lr": 3}).tags == [
        "train/lr",
        "train/tokens_per_s",
    ]


def test_tracked_run_hparams_are_dotted_plain_values() -> None:
    run = slmkit.TrackedRun("r", Path("runs/r"), "tiny", {
        "model": {"n_layers": 2, "dropout": 0.0}, "plugins": {"enable": []},
        "optimizer": {"betas": [0.9, 0.95]}, "probes": [{"name": "induction", "seed": 0}],
    })  # fmt: skip
    assert run.hparams == {
        "model.dropout": 0.0, "model.n_layers": 2, "optimizer.betas": "[0.9, 0.95]",
        "plugins.enable": "[]", "probes.0.name": "induction", "probes.0.seed": 0,
    }  # fmt: skip


def test_kept_events_leave_out_what_a_resumed_run_trained_again() -> None:
    log = [
        {"event": "run_start", "resumed_from_step": None},
        *({"event": "train_step", "step": s, "p": 1} for s in (1, 2, 3, 4)),
        {"event": "checkpoint", "step": 2},
        {"event": "run_start", "resumed_from_step": 2},
        *({"event": "train_step", "step": s, "p": 2} for s in (3, 4, 5)),
        {"event": "run_end", "summary": {"steps": 5}},
    ]
    assert [(e["event"], e.get("step"), e.get("p")) for e in kept_events(log)] == [
        ("run_start", None, None), ("train_step", 1, 1), ("train_step", 2, 1),
        ("checkpoint", 2, None), ("run_start", None, None), ("train_step", 3, 2),
        ("train_step", 4, 2), ("train_step", 5, 2), ("run_end", None, None),
    ]  # fmt: skip


# -- the [[trackers]] kind -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"name": "tensorbord"}, "trackers.0.name: unknown tracker 'tensorbord' (did you "
                                 "mean 'tensorboard'?); known: tensorboard, trackio"),
        ({"name": "tensorboard", "flush": 3}, "trackers.0.flush: unknown key (did you mean "
         "'flush_secs'?); expected one of: name, enabled, folder, flush_secs"),
        ({"name": "tensorboard", "flush_secs": 0}, "trackers.0.flush_secs: must be > 0, got 0"),
        ({"name": "tensorboard", "folder": "../x"}, "trackers.0.folder: must be a folder inside "
                                                    "the run folder, got '../x'"),
        ({"name": "tensorboard", "enabled": "yes"}, "trackers.0.enabled: expected true or "
                                                    "false, got string 'yes'"),
    ],
)  # fmt: skip
def test_a_bad_trackers_table_is_refused_naming_the_key(
    manager: PluginManager, table: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^x\.toml: {re.escape(message)}$"):
        experiment_from_dict({"trackers": [table]}, manager, "x.toml")


def test_a_tracker_enabled_twice_is_refused_naming_the_second(
    write_experiment, manager: PluginManager, capsys
) -> None:
    # trackio holds one current run per process, and two TensorBoard writers would
    # write every value twice: each tracker is fed once
    off = {"name": "tensorboard", "enabled": False, "folder": "off"}
    once = load_experiment(write_experiment({"trackers": [off, {"name": "tensorboard"}]}), manager)
    assert [t.enabled for t in once.arrays["trackers"]] == [False, True]
    twice = [{"name": "tensorboard"}, off, {"name": "tensorboard", "folder": "tb2"}]
    path = write_experiment({"trackers": twice})
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"slmkit: error: {path}: trackers.2.name: tracker 'tensorboard' is enabled twice (also "
        "trackers.0); each tracker may be enabled once\n"
    )
    # a checkpoint's saved experiment is not held to it: no old run is refused
    assert len(experiment_from_dict({"trackers": twice}, manager, "x").arrays["trackers"]) == 3


def test_validate_refuses_a_bad_tracker_in_one_line(write_experiment, capsys) -> None:
    path = write_experiment({"trackers": [{"name": "tensorboard", "flush_secs": -1}]})
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"slmkit: error: {path}: trackers.0.flush_secs: must be > 0, got -1\n"
    )


def test_trackers_are_not_part_of_the_config_hash(manager: PluginManager) -> None:
    # they only watch: a run may be resumed with a tracker added, and runs with and
    # without one are the same experiment
    plain = experiment_from_dict({}, manager, "a")
    tracked = experiment_from_dict(TENSORBOARD, manager, "b")
    assert plain.config_hash == tracked.config_hash
    assert tracked.to_dict()["trackers"] == [
        {"name": "tensorboard", "enabled": True, "folder": "tensorboard", "flush_secs": 10}
    ]


def test_the_trackers_experiment_is_quick_streamed_to_the_built_in_trackers(
    manager: PluginManager,
) -> None:
    quick = load_experiment(ROOT / "experiments" / "quick.toml", manager).to_dict()
    tracked = load_experiment(ROOT / "experiments" / "trackers.toml", manager).to_dict()
    assert [t["name"] for t in tracked.pop("trackers")] == ["tensorboard", "trackio"]
    assert tracked["experiment"].pop("name") == "trackers"
    quick["experiment"].pop("name")
    assert quick.pop("trackers") == []
    assert tracked == quick


# -- TensorBoard ---------------------------------------------------------------------------


def tensorboard_values(run_dir: Path) -> Iterator[tuple[Any, Any]]:
    """``(event, value)`` for every value of the run's event files as written, in order,
    files in name order (values as tensors, whatever the API wrote)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                yield event, value


def tensorboard_records(run_dir: Path) -> dict[str, list[tuple[int, Any]]]:
    """Every value of the run's event files (:func:`tensorboard_values`) by tag:
    ``{tag: [(step, value)]}`` (scalars as floats, texts as strings, histograms as their
    count of values, the hparams as their session's hparams)."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util.tensor_util import make_ndarray

    found: dict[str, list[tuple[int, Any]]] = {}
    for event, value in tensorboard_values(run_dir):
        plugin = value.metadata.plugin_data.plugin_name
        if plugin == "hparams":
            data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
            got: Any = dict(data.session_start_info.hparams) or None
        elif plugin == "text":
            got = make_ndarray(value.tensor).item().decode()
        elif plugin == "histograms":  # buckets of (left, right, count)
            got = int(make_ndarray(value.tensor)[:, 2].sum())
        else:
            got = float(make_ndarray(value.tensor))
        found.setdefault(value.tag, []).append((event.step, got))
    return found


def tracked_records(
    log: list[dict[str, Any]], text_suffix: str, float32: bool
) -> dict[str, list[tuple[int, Any]]]:
    """The tracked values of ``log``'s events, ``{tag: [(step, value)]}``, as a store keeps
    them: scalars (as float32 if ``float32``), histograms as their count of values, texts as
    written (under their tag and ``text_suffix``)."""
    records: dict[str, list[tuple[int, Any]]] = {}
    for event in log:
        values = slmkit.tracked_values(event)
        if values is None:
            continue
        for tag, value in values.scalars.items():
            value = float(np.float32(value)) if float32 else value
            records.setdefault(tag, []).append((values.step, value))
        for tag, numbers in values.histograms.items():
            records.setdefault(tag, []).append((values.step, len(numbers)))
        for tag, text in values.texts.items():
            records.setdefault(tag + text_suffix, []).append((values.step, text))
    return records


#: what a step trained again after a resume measures anew: a store keeps the first value
NOT_REPEATED = ("train/tokens_per_s", "thread_contention/")


def nan_as_text(records: dict[str, list[tuple[int, Any]]]) -> dict[str, list[tuple[int, Any]]]:
    """``records`` sorted by step, NaN as ``"nan"`` (so that equal records compare equal)."""
    return {
        tag: sorted((s, "nan" if isinstance(v, float) and math.isnan(v) else v) for s, v in values)
        for tag, values in records.items()
    }


def assert_holds_the_log_once(
    records: dict[str, list[tuple[int, Any]]], run_dir: Path, text_suffix: str, float32: bool
) -> None:
    """A store's ``records`` of a run hold each step of a tag once: every value the run's
    log kept, maybe some a killed process logged past its checkpoint, nothing else; the
    values of the kept steps are the log's (bar those measured anew, like tokens/s)."""
    log = read_events(run_dir / "log.jsonl")
    kept = tracked_records(kept_events(log), text_suffix, float32)
    logged = tracked_records(log, text_suffix, float32)
    for tag, values in records.items():
        assert len({s for s, _ in values}) == len(values), f"{tag}: a step twice: {values}"

    def pairs(r: dict[str, list[tuple[int, Any]]]) -> set[tuple[str, int]]:
        return {(tag, s) for tag, values in r.items() for s, _ in values}

    assert pairs(kept) <= pairs(records) <= pairs(logged)
    repeated = {tag for tag in kept if not tag.startswith(NOT_REPEATED)}
    assert nan_as_text({t: records[t] for t in repeated}) == nan_as_text(
        {t: kept[t] for t in repeated}
    )


def assert_tensorboard_holds_the_log_once(run_dir: Path) -> dict[str, list[tuple[int, Any]]]:
    records = tensorboard_records(run_dir)
    hparams = {t: records.pop(t) for t in list(records) if t.startswith("_hparams_/")}
    assert_holds_the_log_once(records, run_dir, "/text_summary", float32=True)
    first_end = events(run_dir, "run_end")[0]  # once, at the first end: TensorBoard reads that
    summaries = ("experiment", "session_start_info", "session_end_info")
    assert {tag: [s for s, _ in v] for tag, v in hparams.items()} == {
        f"_hparams_/{summary}": [first_end["summary"]["steps"]] for summary in summaries
    }
    return records


def test_tensorboard_records_a_run_once_with_its_hparams(write_experiment, manager, tmp_path):
    path = write_experiment({**TENSORBOARD, "update_hooks": [{"name": "grad_stats"}],
                             "forward_hooks": [{"name": "attention_entropy"}]})  # fmt: skip
    run_dir = train(path, tmp_path / "runs", manager)
    records = assert_tensorboard_holds_the_log_once(run_dir)
    log = read_events(run_dir / "log.jsonl")
    assert records["train/loss"] == [
        (e["step"], float(np.float32(e["train_loss"]))) for e in log if e["event"] == "train_step"
    ]
    assert [s for s, _ in records["val/loss"]] == [3, 6]
    assert [s for s, _ in records["sample/text_summary"]] == [3, 6]
    assert [s for s, _ in records["update_hook/grad_stats/total"]] == [1, 2, 3, 4, 5, 6]
    assert "forward_hook/attention_entropy/train/blocks.1.attn.hook_pattern" in records
    (end,) = events(run_dir, "run_end")
    assert records["final/best_val_loss"] == [
        (6, float(np.float32(end["summary"]["best_val_loss"])))
    ]
    # each value at the time it was logged, in one events file
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    times = [e.wall_time for e, v in tensorboard_values(run_dir) if v.tag == "train/loss"]
    assert times == [slmkit.tracked_values(e).time for e in log if e["event"] == "train_step"]
    hparams = tensorboard_records(run_dir)["_hparams_/session_start_info"][0][1]
    assert hparams["model.d_model"].number_value == 32
    assert hparams["tokenizer.name"].string_value == "char"
    assert hparams["trackers.0.name"].string_value == "tensorboard"


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """A finished 6-step tiny run without trackers, trained once for the module; a test
    that changes it works on a copy (:func:`copy_of`)."""
    root = tmp_path_factory.mktemp("plain")
    path = root / "tiny.toml"
    path.write_text(tomli_w.dumps(TINY), encoding="utf-8")
    return train(path, root / "runs", PluginManager(entry_points=False).load())


def copy_of(run_dir: Path, runs: Path) -> Path:
    """``run_dir`` copied into the folder ``runs``."""
    return Path(shutil.copytree(run_dir, runs / run_dir.name))


def test_a_tracker_added_on_resume_catches_up_on_the_steps_before(
    plain_run, write_experiment, manager, tmp_path
) -> None:
    runs = tmp_path / "runs"
    run_dir = copy_of(plain_run, runs)  # 6 steps, no tracker
    # trained on to step 9 with TensorBoard added: allowed (trackers are not part of what
    # the experiment is), and the record starts at step 1
    longer = write_experiment({**TENSORBOARD, "training": {"max_steps": 9}}, name="more.toml")
    train(longer, runs, manager, resume=run_dir)
    records = assert_tensorboard_holds_the_log_once(run_dir)
    assert [s for s, _ in records["train/loss"]] == list(range(1, 10))
    assert [s for s, _ in records["final/val_loss"]] == [6, 9]


# -- trackio ------------------------------------------------------------------------------


def trackio_records(project: str, run_id: str) -> dict[str, list[tuple[int, Any]]]:
    """Every value trackio's store holds of a run, read through trackio: ``{tag: [(step,
    value)]}`` (histograms as their count of values, texts as written)."""
    import trackio

    found: dict[str, list[tuple[int, Any]]] = {}
    for row in trackio.SQLiteStorage.get_logs(project, run_id):
        for key, value in row.items():
            if key in ("step", "timestamp"):
                continue
            kind = value.get("_type") if isinstance(value, dict) else None
            if kind == "trackio.histogram":
                value = int(sum(value["values"]))
            elif kind == "trackio.markdown":
                value = value["_value"]
            found.setdefault(key, []).append((row["step"], value))
    return found


def assert_trackio_holds_the_log_once(run_dir: Path, project: str = "tiny") -> None:
    records = trackio_records(project, run_dir.name)
    assert_holds_the_log_once(records, run_dir, "", float32=False)
    (end,) = events(run_dir, "run_end")
    assert records["final/val_loss"] == [(end["summary"]["steps"], end["summary"]["val_loss"])]


def test_trackio_records_a_run_once_in_the_experiments_project(
    write_experiment, manager, tmp_path, trackio_store
) -> None:
    import trackio

    path = write_experiment({"trackers": [{"name": "trackio"}],
                             "probes": [{"name": "induction"}]})  # fmt: skip
    sweep = {"id": "20261202-sweep-ab12", "index": 1, "size": 2, "overrides": []}
    exp = load_experiment(path, manager)
    summary = Trainer(exp, manager, str(path), runs_dir=tmp_path / "runs", sweep=sweep,
                      console=Console(quiet=True)).run()  # fmt: skip
    run_dir = Path(summary["run_dir"])
    assert_trackio_holds_the_log_once(run_dir)
    records = trackio_records("tiny", run_dir.name)
    assert [s for s, _ in records["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in records["probe/induction/score"]] == [3, 6]
    assert records["sample"][0][1].startswith("    \n    ")
    # one run, named by the run id, in the experiment's project, grouped by its sweep
    assert [r.name for r in trackio.Api().runs("tiny")] == [run_dir.name]
    config = trackio.SQLiteStorage.get_run_config("tiny", run_dir.name)
    assert config["_Group"] == sweep["id"]
    written = tomllib.loads((run_dir / "experiment.toml").read_text())
    hparams = slmkit.TrackedRun(run_dir.name, run_dir, "tiny", written).hparams
    assert {k: v for k, v in config.items() if not k.startswith("_")} == hparams
    assert (trackio_store / "tiny.db").is_file()


def test_a_resumed_run_continues_the_same_records_once(
    write_experiment, manager, tmp_path, monkeypatch
) -> None:
    # the first process logs steps 1..6 and crashes in the evaluation of step 6; the
    # resumed one trains 4..6 again (bit for bit): what the stores hold is not written twice
    evaluate = Trainer._evaluate

    def crash_at_6(self: Trainer, run: slmkit.Run) -> None:
        if self.state.step == 6:
            raise RuntimeError("crash")
        evaluate(self, run)

    monkeypatch.setattr(Trainer, "_evaluate", crash_at_6)
    path = write_experiment({**BOTH, "experiment": {"name": "crashing", "seed": 7}})
    runs = tmp_path / "runs"
    with pytest.raises(RuntimeError, match="crash"):
        train(path, runs, manager)
    (run_dir,) = runs.iterdir()
    held = tensorboard_records(run_dir)
    assert [s for s, _ in held["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in held["val/loss"]] == [3]
    assert [s for s, _ in trackio_records("crashing", run_dir.name)["train/loss"]] == [
        1, 2, 3, 4, 5, 6]  # fmt: skip
    monkeypatch.setattr(Trainer, "_evaluate", evaluate)
    train(path, runs, manager, resume=run_dir)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    records = assert_tensorboard_holds_the_log_once(run_dir)
    assert records["train/loss"] == held["train/loss"]  # nothing written again
    assert [s for s, _ in records["val/loss"]] == [3, 6]
    assert_trackio_holds_the_log_once(run_dir, "crashing")
    # exported from the log, a resumed run gives the steps it kept, each once
    shutil.rmtree(run_dir / "tensorboard")
    assert main(["export", str(run_dir), "--to", "tensorboard"]) == 0
    assert_tensorboard_holds_the_log_once(run_dir)


# -- slmkit export -------------------------------------------------------------------------


def test_export_writes_what_streaming_wrote_and_never_twice(
    write_experiment, manager, tmp_path, capsys
) -> None:
    import trackio

    path = write_experiment({**BOTH, "experiment": {"name": "exported", "seed": 7},
                             "update_hooks": [{"name": "grad_stats"}]})  # fmt: skip
    run_dir = train(path, tmp_path / "runs", manager)
    streamed = tensorboard_records(run_dir), trackio_records("exported", run_dir.name)
    # the stores lose the run; exported from its log, they hold what streaming gave them,
    # tokens/s and TensorBoard's wall times included
    wall_times = sorted(tensorboard_wall_times(run_dir))
    shutil.rmtree(run_dir / "tensorboard")
    (trackio_run,) = trackio.Api().runs("exported")
    assert trackio_run.delete()
    for tracker in ("tensorboard", "trackio"):
        assert (
            main(["export", run_dir.name, "--to", tracker, "--runs-dir", str(run_dir.parent)]) == 0
        )
        said = capsys.readouterr().out
        assert said.startswith(f"exported {run_dir} to {tracker}: ") and said.count("\n") == 1
    exported = tensorboard_records(run_dir), trackio_records("exported", run_dir.name)
    assert nan_as_text(exported[0]) == nan_as_text(streamed[0])
    assert nan_as_text(exported[1]) == nan_as_text(streamed[1])
    assert sorted(tensorboard_wall_times(run_dir)) == wall_times
    # exported again (or after streaming): nothing is written twice
    assert main(["export", str(run_dir), "--to", "tensorboard"]) == 0
    assert main(["export", str(run_dir), "--to", "trackio"]) == 0
    assert tensorboard_records(run_dir) == exported[0]
    assert nan_as_text(trackio_records("exported", run_dir.name)) == nan_as_text(exported[1])


def test_a_run_says_where_each_tracker_writes_as_it_starts(
    write_experiment, manager, tmp_path, trackio_store
) -> None:
    path = write_experiment({**BOTH, "experiment": {"name": "said where", "seed": 1}})
    shown = io.StringIO()
    summary = Trainer(load_experiment(path, manager), manager, str(path),
                      runs_dir=tmp_path / "runs", console=Console(shown)).run()  # fmt: skip
    run_dir = Path(summary["run_dir"])
    lines = shown.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"run {run_dir.name}: "))
    folder = run_dir / "tensorboard"
    assert lines[start + 1 : start + 3] == [
        f"tracker tensorboard: {folder} (to look: tensorboard --logdir {folder})",
        f"tracker trackio: project 'said where', run {run_dir.name}, in "
        f"{trackio_store / 'saidwhere.db'} (to look: trackio show --project 'said where')",
    ]


def tensorboard_wall_times(run_dir: Path) -> list[float]:
    """The wall time of every value in the run's event files."""
    return [event.wall_time for event, _ in tensorboard_values(run_dir)]


def test_an_old_run_without_trackers_joins_by_export(plain_run, tmp_path):
    run_dir = copy_of(plain_run, tmp_path / "runs")
    assert not (run_dir / "tensorboard").exists()
    assert main(["export", str(run_dir), "--to", "tensorboard"]) == 0
    assert_tensorboard_holds_the_log_once(run_dir)


def test_export_refuses_with_one_line(plain_run, capsys, monkeypatch):
    run_dir = plain_run  # every export here is refused: nothing is written to it
    runs = str(run_dir.parent)
    cases = [
        (["export", "nope", "--to", "tensorboard", "--runs-dir", runs],
         f"nope: no such run (neither a run folder nor a run id in {runs})"),
        (["export", str(run_dir), "--to", "tensorbord"],
         "--to: unknown tracker 'tensorbord' (did you mean 'tensorboard'?); known: "
         "tensorboard, trackio"),
        (["export", "--to", "tensorboard"], "export: name at least one run (a run folder or id)"),
    ]  # fmt: skip
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    cases.append((["export", str(run_dir), "--to", "tensorboard"],
                  f"{run_dir}: tracker 'tensorboard' (slmkit_builtin.tensorboard) failed at "
                  "step 0: ImportError: TensorBoard is not installed (import of "
                  "torch.utils.tensorboard halted; None in sys.modules): pip install "
                  "'slmkit[tensorboard]' (or uv sync --extra tensorboard)"))  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", f"slmkit: error: {message}\n")
    assert not (run_dir / "tensorboard").exists()


KILL_DRIVER = Path(__file__).with_name("kill_driver.py")


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_with_each_step_once_in_both_trackers(
    write_experiment, tmp_path
) -> None:
    # SIGKILL half-way through writing the checkpoint of step 8: the log has steps 1..8,
    # the trackers whatever they had flushed; the resumed process continues from step 4
    path = write_experiment({
        **BOTH, "experiment": {"name": "killed", "seed": 7},
        "training": {"max_steps": 12, "checkpoint_every": 4, "eval_every": 4, "threads": 1},
        "sampling": {"every": 4, "max_new_tokens": 8},
    })  # fmt: skip
    runs = tmp_path / "runs"
    command = [sys.executable, str(KILL_DRIVER), "save", "2", "run", str(path)]
    killed = subprocess.run([*command, "--runs-dir", str(runs)], capture_output=True, text=True,
                            timeout=600, check=False)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (run_dir,) = runs.iterdir()
    logged = read_events(run_dir / "log.jsonl")
    assert [e["step"] for e in logged if e["event"] == "train_step"] == list(range(1, 9))
    resumed = subprocess.run(
        [sys.executable, "-m", "slmkit", "run", str(path), "--resume", str(run_dir)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "tracker" not in resumed.stderr
    records = assert_tensorboard_holds_the_log_once(run_dir)
    assert [s for s, _ in records["train/loss"]] == list(range(1, 13))
    assert [s for s, _ in records["val/loss"]] == [4, 8, 12]
    assert_trackio_holds_the_log_once(run_dir, "killed")
    assert [s for s, _ in trackio_records("killed", run_dir.name)["train/loss"]] == list(
        range(1, 13)
    )


# -- a failing tracker never stops the run --------------------------------------------------


@pytest.mark.parametrize(
    ("tracker", "module", "extra", "missing"),
    [
        ("tensorboard", "torch.utils.tensorboard", "tensorboard", "TensorBoard"),
        ("trackio", "trackio", "trackio", "trackio"),
    ],
)
def test_a_missing_tracker_package_is_one_line_and_the_run_completes(
    write_experiment, manager, tmp_path, monkeypatch, capsys, tracker, module, extra, missing
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    path = write_experiment({"trackers": [{"name": tracker}]})
    runs = tmp_path / "runs"
    assert main(["run", str(path), "--runs-dir", str(runs)]) == 0
    (run_dir,) = runs.iterdir()
    error = (
        f"ImportError: {missing} is not installed (import of {module} halted; None in "
        f"sys.modules): pip install 'slmkit[{extra}]' (or uv sync --extra {extra})"
    )
    message = f"tracker {tracker!r} (slmkit_builtin.{tracker}) failed at step 0: {error}"
    assert capsys.readouterr().err.splitlines() == [
        f"slmkit: warning: {message}; the run goes on without it"
    ]
    log = read_events(run_dir / "log.jsonl")
    (failed,) = [e for e in log if e["event"] == "tracker_failed"]
    assert (failed["tracker"], failed["plugin"], failed["step"], failed["error"]) == (
        tracker, f"slmkit_builtin.{tracker}", 0, message)  # fmt: skip
    assert [e["step"] for e in log if e["event"] == "train_step"] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in log if e["event"] == "checkpoint"] == [3, 6]
    assert log[-1]["event"] == "run_end"
    assert not (run_dir / "tensorboard").exists()


#: what FlakyTracker saw
FLAKY: dict[str, Any] = {"error": OSError(28, "No space left on device")}


class FlakyTracker:
    """Records steps until step 4, where its disk is full."""

    def __init__(self, options: Any) -> None:
        for key in ("opened", "closed"):
            FLAKY.pop(key, None)

    def open(self, run: slmkit.TrackedRun) -> None:
        FLAKY["opened"] = run

    def record(self, event: dict[str, Any]) -> None:
        if event.get("step") == 4:
            raise FLAKY["error"]

    def close(self) -> None:
        FLAKY["closed"] = True


class FlakyPlugin:
    @slmkit.hookimpl
    def register_trackers(self, register: slmkit.Register) -> None:
        register("flaky", FlakyTracker)


@pytest.mark.parametrize(
    ("error", "said"),
    [(OSError(28, "No space left on device"), "OSError: [Errno 28] No space left on device"),
     (SystemExit(2), "SystemExit: 2")],  # a tracker calling sys.exit() does not end the run
    ids=["full disk", "sys.exit"],
)  # fmt: skip
def test_a_tracker_failing_midway_is_dropped_once_and_the_others_go_on(
    write_experiment, manager, tmp_path, capsys, monkeypatch, error, said
) -> None:
    monkeypatch.setitem(FLAKY, "error", error)
    manager.add(FlakyPlugin(), "flaky-plugin")
    path = write_experiment({"plugins": {"enable": ["flaky-plugin"]},
                             "trackers": [{"name": "flaky"}, {"name": "tensorboard"}]})  # fmt: skip
    run_dir = train(path, tmp_path / "runs", manager)
    assert capsys.readouterr().err.splitlines() == [
        f"slmkit: warning: tracker 'flaky' (flaky-plugin) failed at step 4: {said}; "
        "the run goes on without it"
    ]
    opened = FLAKY["opened"]
    assert (opened.run_id, opened.run_dir, opened.name) == (run_dir.name, run_dir, "tiny")
    assert opened.experiment["model"]["d_model"] == 32 and opened.sweep is None
    assert FLAKY["closed"]  # closed after its failure: what it held may still be written
    log = read_events(run_dir / "log.jsonl")
    (failed,) = [e for e in log if e["event"] == "tracker_failed"]
    assert (failed["tracker"], failed["step"]) == ("flaky", 4)
    assert [e["step"] for e in log if e["event"] == "train_step"] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["event"] == "run_end"
    assert_tensorboard_holds_the_log_once(run_dir)  # the other tracker had everything
