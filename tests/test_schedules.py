"""The ``cosine``, ``linear`` and ``wsd`` learning-rate schedules (slmkit_builtin.schedules)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Interrupt
from hypothesis import given, settings
from hypothesis import strategies as st
from slmkit_builtin.schedules import (
    CosineOptions,
    CosineSchedule,
    LinearOptions,
    LinearSchedule,
    WSDOptions,
    WSDSchedule,
    build_cosine,
    build_linear,
    build_wsd,
)

import slmkit
import slmkit.plugins
from slmkit import checkpoint
from slmkit.build import build_schedule
from slmkit.config.resolve import experiment_from_dict, load_experiment
from slmkit.errors import ConfigError, RunError
from slmkit.plugins import PluginManager
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.train import Trainer

PLUGINS = (*slmkit.plugins.DEFAULT_PLUGINS, "slmkit_builtin.schedules")


@pytest.fixture
def schedules_manager() -> PluginManager:
    """The built-ins plus the schedules plugin (whether or not it is a default yet)."""
    return PluginManager(default_plugins=tuple(dict.fromkeys(PLUGINS)), entry_points=False).load()


# -- exact multipliers ----------------------------------------------------------------


def test_cosine_multipliers() -> None:
    s = CosineSchedule(warmup_steps=10, min_lr_ratio=0.1, max_steps=110)
    assert s(0) == 0.1  # (0 + 1) / 10: the first step is not zero
    assert s(4) == 0.5
    assert s(9) == 1.0  # end of warmup: the full rate
    assert s(10) == pytest.approx(1.0, abs=1e-15)  # decay starts at 1
    assert s(60) == pytest.approx(0.55, abs=1e-15)  # half way: 0.1 + 0.9 * 0.5
    assert s(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    assert s(109) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert s(109) > 0.1  # the last step is just above the minimum, reached at max_steps
    assert s(110) == s(111) == s(10_000) == 0.1  # clamped
    no_warmup = CosineSchedule(warmup_steps=0, min_lr_ratio=0.0, max_steps=4)
    assert no_warmup(0) == 1.0
    assert [no_warmup(i) for i in (1, 2, 3)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * i / 4)) for i in (1, 2, 3)], abs=1e-15
    )
    assert no_warmup(4) == no_warmup(5) == 0.0


def test_linear_multipliers() -> None:
    s = LinearSchedule(warmup_steps=4, min_lr_ratio=0.2, max_steps=14)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0
    assert s(9) == pytest.approx(0.6, abs=1e-15)  # half way: 0.2 + 0.8 * 0.5
    assert s(13) == pytest.approx(0.2 + 0.8 * 0.1, abs=1e-15)  # the last step
    assert s(14) == s(20) == 0.2
    assert [LinearSchedule(0, 0.0, 4)(i) for i in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


@pytest.mark.parametrize(
    ("decay", "half_way"),
    [("sqrt", 1 - math.sqrt(0.5)), ("linear", 0.5), ("cosine", 0.5 * (1 + math.cos(math.pi / 2)))],
)
def test_wsd_multipliers(decay: str, half_way: float) -> None:
    # 100 steps, decay over the last 20 (steps 80..99), warmup 5
    s = WSDSchedule(warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0, decay=decay,
                    max_steps=100)  # fmt: skip
    assert (s.decay_steps, s.decay_start) == (20, 80)
    assert [s(i) for i in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert s(5) == s(50) == s(79) == s(80) == 1.0  # stable, and the decay starts at 1
    assert s(90) == pytest.approx(half_way, abs=1e-15)
    assert 0.0 < s(99) < 0.25  # the last step: 19/20 of the way down
    assert s(100) == s(1000) == 0.0
    floor = WSDSchedule(0, 0.2, 0.1, decay, 100)
    assert floor(0) == 1.0
    assert floor(90) == pytest.approx(0.1 + 0.9 * half_way, abs=1e-15)
    assert floor(100) == 0.1


def test_wsd_default_is_sqrt_over_the_last_tenth() -> None:
    s = build_wsd(WSDOptions(), 1000)
    assert (s.decay, s.decay_start, s.decay_steps, s.min_lr_ratio) == ("sqrt", 900, 100, 0.0)
    assert s(925) == pytest.approx(0.5)  # 1 - sqrt(1/4)
    # round(0.1 * 25) = 2 decay steps; tiny runs still decay over at least one step
    assert build_wsd(WSDOptions(), 25).decay_steps == 2
    one = build_wsd(WSDOptions(), 1)
    assert (one.decay_steps, one(0), one(1)) == (1, 1.0, 0.0)


def test_defaults() -> None:
    assert (CosineOptions().warmup_steps, CosineOptions().min_lr_ratio) == (0, 0.1)
    assert (LinearOptions().warmup_steps, LinearOptions().min_lr_ratio) == (0, 0.1)
    assert WSDOptions() == WSDOptions(warmup_steps=0, decay_fraction=0.1, min_lr_ratio=0.0,
                                      decay="sqrt")  # fmt: skip


def test_schedules_keep_no_state() -> None:
    # pure functions of the step: nothing to checkpoint, resume is exact by construction
    for s in (build_cosine(CosineOptions(), 10), build_linear(LinearOptions(), 10),
              build_wsd(WSDOptions(), 10)):  # fmt: skip
        assert not hasattr(s, "state_dict") and not hasattr(s, "load_state_dict")
        assert [s(i) for i in range(12)] == [s(i) for i in range(12)]


# -- shape, for any length ------------------------------------------------------------


@st.composite
def schedules(draw: st.DrawFn) -> tuple[Any, int, int]:
    """(schedule, warmup_steps, max_steps) of any kind with valid options."""
    max_steps = draw(st.integers(1, 400))
    ratio = draw(st.floats(0, 1))
    kind = draw(st.sampled_from(["cosine", "linear", "wsd"]))
    if kind == "wsd":
        fraction = draw(st.floats(0, 1, exclude_min=True))
        decay_start = max_steps - max(1, round(fraction * max_steps))
        warmup = draw(st.integers(0, decay_start))
        decay = draw(st.sampled_from(["sqrt", "linear", "cosine"]))
        return build_wsd(WSDOptions(warmup, fraction, ratio, decay), max_steps), warmup, max_steps
    warmup = draw(st.integers(0, max_steps - 1))
    build = build_cosine if kind == "cosine" else build_linear
    options = (CosineOptions if kind == "cosine" else LinearOptions)(warmup, ratio)
    return build(options, max_steps), warmup, max_steps


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_warmup_rises_then_never_increases(case: tuple[Any, int, int]) -> None:
    s, warmup, max_steps = case
    values = [s(step) for step in range(max_steps + 3)]
    assert values[0] > 0
    assert all(a < b for a, b in itertools.pairwise(values[:warmup]))
    if warmup:
        assert values[warmup - 1] == 1.0
    after = values[warmup:]
    assert after[0] == 1.0
    assert all(b <= a for a, b in itertools.pairwise(after))
    assert all(0.0 < v <= 1.0 for v in values[:warmup])
    assert all(s.min_lr_ratio <= v <= 1.0 for v in after)
    assert values[max_steps:] == [s.min_lr_ratio] * 3  # clamped past max_steps


# -- options, through the experiment ---------------------------------------------------


def resolve(schedule: dict[str, Any], manager: PluginManager, max_steps: int = 6) -> Any:
    data = {"schedule": schedule, "training": {"max_steps": max_steps}}
    return experiment_from_dict(data, manager, "experiments/x.toml")


@pytest.mark.parametrize(
    ("schedule", "key", "message"),
    [
        ({"name": "cosine", "min_lr_ratio": 1.5}, "schedule.min_lr_ratio", "must be in [0, 1]"),
        ({"name": "linear", "min_lr_ratio": -0.1}, "schedule.min_lr_ratio", "must be in [0, 1]"),
        ({"name": "cosine", "warmup_steps": -1}, "schedule.warmup_steps", "must be >= 0"),
        ({"name": "cosine", "warmup_steps": 1.5}, "schedule.warmup_steps", "integer"),
        ({"name": "cosine", "min_lr": 0.1}, "schedule.min_lr", "did you mean 'min_lr_ratio'?"),
        ({"name": "linear", "warmup_step": 5}, "schedule.warmup_step",
         "did you mean 'warmup_steps'?"),
        ({"name": "wsd", "decay_fraction": 0.0}, "schedule.decay_fraction", "must be in (0, 1]"),
        ({"name": "wsd", "decay_fraction": 1.5}, "schedule.decay_fraction", "must be in (0, 1]"),
        ({"name": "wsd", "decay": "exp"}, "schedule.decay",
         "must be one of 'linear', 'cosine', 'sqrt'"),
        ({"name": "cosine", "decay": "sqrt"}, "schedule.decay", "unknown key"),
        ({"name": "cosin"}, "schedule.name", "cosine"),
    ],
)  # fmt: skip
def test_option_errors_name_the_key(schedules_manager, schedule, key, message) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(schedule, schedules_manager)
    assert info.value.key == key
    assert str(info.value).startswith(f"experiments/x.toml: {key}: ")
    assert message in info.value.message


def test_valid_options_resolve(schedules_manager) -> None:
    exp = resolve({"name": "wsd", "warmup_steps": 2, "decay": "cosine", "decay_fraction": 1},
                  schedules_manager)  # fmt: skip
    assert exp.schedule.options == WSDOptions(2, 1.0, 0.0, "cosine")
    assert exp.to_dict()["schedule"] == {"name": "wsd", "warmup_steps": 2, "decay_fraction": 1.0,
                                         "min_lr_ratio": 0.0, "decay": "cosine"}  # fmt: skip


def test_warmup_not_shorter_than_the_run_is_an_error_when_built(
    schedules_manager, write_experiment
) -> None:
    path = write_experiment({"schedule": {"name": "cosine", "warmup_steps": 6}})  # max_steps 6
    exp = load_experiment(path, schedules_manager)
    with pytest.raises(ConfigError) as info:
        Trainer(exp, schedules_manager, str(path), console=Console(quiet=True))
    assert info.value.key == "schedule.warmup_steps"
    message = "schedule.warmup_steps: must be < training.max_steps=6, got 6"
    assert str(info.value) == f"{path}: {message}"
    linear = resolve({"name": "linear", "warmup_steps": 9}, schedules_manager)
    with pytest.raises(ConfigError, match=r"schedule.warmup_steps: must be < training.max_steps"):
        build_schedule(linear)
    cosine = resolve({"name": "cosine", "warmup_steps": 5}, schedules_manager)
    assert build_schedule(cosine)(4) == 1.0


def test_wsd_warmup_must_end_before_the_decay(schedules_manager) -> None:
    schedule = {"name": "wsd", "warmup_steps": 41, "decay_fraction": 0.2}
    with pytest.raises(ConfigError, match=r"schedule.warmup_steps: must be <= 40, where the decay "
                       r"over the last 10 steps .* starts, got 41"):  # fmt: skip
        build_schedule(resolve(schedule, schedules_manager, max_steps=50))
    exp = resolve({**schedule, "warmup_steps": 40}, schedules_manager, max_steps=50)
    s = build_schedule(exp)
    assert (s(39), s(40), s(49) < 1.0) == (1.0, 1.0, True)


# -- in a run --------------------------------------------------------------------------


RUN: dict[str, Any] = {
    "schedule": {"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
    "plugins": {"enable": ["interrupt"]},
    "training": {"max_steps": 8, "checkpoint_every": 2, "eval_every": 0, "log_every": 1},
    "sampling": {"every": 0},
}


def train(path: Path, manager: PluginManager, runs: Path, overrides=(), resume=None):
    exp = load_experiment(path, manager, overrides)
    trainer = Trainer(exp, manager, str(path), runs_dir=runs, resume=resume,
                      console=Console(quiet=True))  # fmt: skip
    return trainer, Path(trainer.run()["run_dir"])


def steps(run_dir: Path) -> list[tuple[int, float, float]]:
    """``(step, train_loss, lr)`` of every train_step event."""
    return [(e["step"], e["train_loss"], e["lr"]) for e in read_events(run_dir / "log.jsonl")
            if e["event"] == "train_step"]  # fmt: skip


def test_cosine_run_logs_its_lr_and_resumes_bit_exactly(
    schedules_manager, write_experiment, tmp_path
) -> None:
    interrupt = Interrupt()
    schedules_manager.add(interrupt, "interrupt")
    path = write_experiment(RUN)
    exp = load_experiment(path, schedules_manager)
    lr = exp.optimizer.learning_rate

    trainer, full = train(path, schedules_manager, tmp_path / "full")
    logged = steps(full)
    assert [s for s, _, _ in logged] == list(range(1, 9))
    # train_step N ran at optimizer step N - 1, counted from 0
    expected = build_cosine(CosineOptions(warmup_steps=2, min_lr_ratio=0.1), 8)
    assert [v for _, _, v in logged] == [lr * expected(s - 1) for s, _, _ in logged]
    assert (logged[0][2], logged[1][2]) == (lr * 0.5, lr)  # warmup, then the full rate
    assert logged[-1][2] == lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert trainer.optimizer.param_groups[0]["lr"] == logged[-1][2]

    # fail right after the checkpoint of step 4, then resume that run folder to step 8
    interrupt.at = 4
    with pytest.raises(RunError, match="interrupted at step 4"):
        train(path, schedules_manager, tmp_path / "half")
    (half,) = (tmp_path / "half").iterdir()
    assert checkpoint.load(half)["step"] == 4
    assert checkpoint.load(half)["schedule"] == {}  # stateless: nothing saved
    interrupt.at = None
    _, resumed = train(path, schedules_manager, tmp_path / "unused", resume=half)
    assert resumed == half
    assert steps(resumed) == logged  # the same losses and learning rates, bit for bit
    full_params, resumed_params = checkpoint.load(full)["model"], checkpoint.load(half)["model"]
    assert full_params.keys() == resumed_params.keys()
    for name, value in full_params.items():
        assert torch.equal(value, resumed_params[name]), name


def test_a_longer_resumed_run_follows_the_new_curve(
    schedules_manager, write_experiment, tmp_path
) -> None:
    # training.max_steps is the one key a resume may change: the schedule is rebuilt for
    # the new length, and the steps still to run follow the new curve
    schedules_manager.add(Interrupt(), "interrupt")
    path = write_experiment(RUN)
    lr = load_experiment(path, schedules_manager).optimizer.learning_rate
    _, short = train(path, schedules_manager, tmp_path / "short", ["training.max_steps=4"])
    _, longer = train(path, schedules_manager, tmp_path / "unused", resume=short)
    four, eight = (build_cosine(CosineOptions(2, 0.1), n) for n in (4, 8))
    assert [(s, v) for s, _, v in steps(longer)] == (
        [(s, lr * four(s - 1)) for s in range(1, 5)] + [(s, lr * eight(s - 1)) for s in range(5, 9)]
    )
