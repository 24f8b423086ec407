"""The run log: every line strict JSON, non-finite values as null with a note."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from conftest import Interrupt, train

import slmkit
from slmkit.cli import main
from slmkit.errors import RunError
from slmkit.plugins import PluginManager
from slmkit.runlog import RunLog
from slmkit.runs import read_run


def reject_constant(token: str) -> Any:
    raise ValueError(f"not JSON: {token}")


def strict_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of the run's log, parsed by a parser that refuses NaN and Infinity."""
    lines = (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line, parse_constant=reject_constant) for line in lines]


class NaNOnce:
    """An update hook that turns a weight into NaN after step 3's backward and puts it back
    at step 4: the validation at step 3 and the loss of step 4 are NaN, the rest finite."""

    def __init__(self, options: Any) -> None:
        self.saved: torch.Tensor | None = None

    def apply(self, parameters: list[tuple[str, torch.nn.Parameter]], step: int, log: bool):
        _, weight = parameters[0]
        if step == 3:
            self.saved = weight.detach().clone()
            weight.data.fill_(float("nan"))
        elif step == 4 and self.saved is not None:
            weight.data.copy_(self.saved)
        return {"norm": float("inf") if step == 4 else 1.0, "each": [1.0, float("-inf")]}


class NaNPlugin:
    @slmkit.hookimpl
    def register_update_hooks(self, register):
        register("nan_once", NaNOnce)


def test_every_line_of_a_run_and_its_resume_is_strict_json(write_experiment, tmp_path) -> None:
    manager = PluginManager(entry_points=False).load()
    interrupt = Interrupt()
    interrupt.at = 3
    manager.add(interrupt, "interrupt")
    path = write_experiment({"plugins": {"enable": ["interrupt"]}})
    runs = tmp_path / "runs"
    with contextlib.suppress(RunError):
        train(path, runs, manager)
    (run_dir,) = runs.iterdir()
    interrupt.at = None
    train(path, runs, manager, resume=run_dir, overrides=["training.max_steps=8"])
    events = strict_events(run_dir)
    names = [e["event"] for e in events]
    assert names.count("run_start") == 2 and names[-1] == "run_end"
    assert {"run_failed", "train_step", "eval", "sample", "checkpoint"} <= set(names)
    assert not [e for e in events if "nonfinite" in e]


def test_a_nan_loss_is_logged_as_null_with_a_note(write_experiment, tmp_path) -> None:
    manager = PluginManager(entry_points=False).load()
    manager.add(NaNPlugin(), "nan-plugin")
    path = write_experiment({
        "plugins": {"enable": ["nan-plugin"]},
        # no checkpoint (refused of non-finite weights) and no sample at step 3
        "training": {"on_nonfinite": "skip", "checkpoint_every": 0},
        "sampling": {"every": 0},
        "update_hooks": [{"name": "nan_once"}],
    })  # fmt: skip
    run_dir = train(path, tmp_path / "runs", manager)
    events = strict_events(run_dir)
    by = {(e["event"], e.get("step")): e for e in events}
    step4 = by[("train_step", 4)]
    assert (step4["train_loss"], step4["nonfinite"]) == (None, {"train_loss": "nan"})
    # step 3's update leaves the hook's NaN weight: skipped (undone); step 4's loss is NaN
    assert by[("nonfinite_skipped", 3)]["cause"] == "weights after the update"
    assert by[("nonfinite_skipped", 4)]["skipped_steps"] == 2
    eval3 = by[("eval", 3)]
    assert (eval3["val_loss"], eval3["val_bpc"]) == (None, None)
    assert eval3["nonfinite"] == {"val_loss": "nan", "val_bpc": "nan"}
    hook4 = by[("update_hook", 4)]
    assert hook4["metrics"] == {"norm": None, "each": [1.0, None]}
    assert hook4["nonfinite"] == {"metrics.norm": "inf", "metrics.each.1": "-inf"}
    assert "nonfinite" not in by[("train_step", 5)] and "nonfinite" not in by[("eval", 6)]
    # the best validation loss is the best finite one; NaN never hides a later value
    end = by[("run_end", None)]["summary"]
    assert end["best_val_loss"] == end["val_loss"] == by[("eval", 6)]["val_loss"]
    # read back: the null is a gap in the curve, and `runs --json` is strict JSON too
    record = read_run(run_dir)
    assert record.train_curve.steps == [1, 2, 3, 4, 5, 6]
    assert str(record.train_curve.values[3]) == "nan"
    assert record.best_val_loss == end["best_val_loss"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["runs", str(run_dir.parent), "--json"]) == 0
    (listed,) = json.loads(out.getvalue(), parse_constant=reject_constant)
    assert listed["best_val_loss"] == end["best_val_loss"]


def test_the_log_writes_null_for_every_non_finite_float(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "log.jsonl", "r")
    log.event("probe", a=float("nan"), b={"c": [float("inf"), 2.0]}, d=-float("inf"), e=1.5)
    log.close()
    (event,) = strict_events(tmp_path)
    assert (event["a"], event["b"], event["d"], event["e"]) == (None, {"c": [None, 2.0]}, None, 1.5)
    assert event["nonfinite"] == {"a": "nan", "b.c.0": "inf", "d": "-inf"}
