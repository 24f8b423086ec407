"""Faults injected on purpose: signals, kills, damaged and hostile files, NaNs, full disks."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import slmkit
from slmkit import checkpoint
from slmkit.cli import main
from slmkit.config.resolve import load_experiment
from slmkit.distributed import World
from slmkit.errors import CheckpointError, RunError
from slmkit.plugins import PluginManager
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.runs import list_runs
from slmkit.signals import StopSignals, launcher, resume_command
from slmkit.train import Trainer


def trainer(path: Path, runs: Path, manager: PluginManager, overrides=(), resume=None) -> Trainer:
    exp = load_experiment(path, manager, overrides)
    return Trainer(exp, manager, str(path), runs_dir=runs, resume=resume,
                   console=Console(quiet=True))  # fmt: skip


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "checkpoints" / "latest.pt")["model"]


def assert_equal_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def start(path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "slmkit", "run", str(path), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


#: the environment of a run started without uv (`uv run pytest` exports UV to its children)
NO_UV = {k: v for k, v in os.environ.items() if k != "UV"}
#: how a child started as `python -m slmkit` without uv is told to start slmkit again
PYTHON_M = launcher(argv0="/somewhere/slmkit/__main__.py", environ={})


def wait_for(
    condition, timeout: float = 120.0, proc: subprocess.Popen | None = None, interval: float = 0.005
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        assert proc is None or proc.poll() is None, "the run ended too early"
        time.sleep(interval)


LONG = {"training": {"max_steps": 400, "checkpoint_every": 20, "eval_every": 0},
        "sampling": {"every": 0}}  # fmt: skip


# -- interruptions -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_resume_completes_exactly(
    write_experiment, manager, tmp_path, signum, code
) -> None:
    path = write_experiment(LONG)
    runs = tmp_path / "runs"
    proc = start(path, "--runs-dir", str(runs), env=NO_UV)
    wait_for(lambda: list(runs.glob("*/checkpoints/step_20.pt")), proc=proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code
    (run_dir,) = runs.iterdir()
    events = read_events(run_dir / "log.jsonl")
    stopped = events[-1]
    assert stopped["event"] == "run_interrupted"
    assert stopped["signal"] == signal.Signals(signum).name
    saved = checkpoint.load(run_dir)
    assert saved["step"] == stopped["step"] < 400
    assert err.strip() == (
        f"slmkit: stopped by {signal.Signals(signum).name} at step {stopped['step']}: saved "
        f"{run_dir / 'checkpoints' / ('step_' + str(stopped['step']) + '.pt')}; resume with: "
        f"{PYTHON_M} run {path} --resume {run_dir}"
    )
    trainer(path, tmp_path / "x", manager, resume=run_dir).run()
    full = Path(trainer(path, tmp_path / "full", manager).run()["run_dir"])
    assert_equal_parameters(final_parameters(run_dir), final_parameters(full))


class RaceWorld(World):
    """Two ranks in one process: the other rank's value, and a signal delivered to this
    rank while the collective runs (its handler runs before the result comes back)."""

    def __init__(self, stop: list[StopSignals], other: int = 0) -> None:
        super().__init__(rank=0, world_size=2, launched=True)
        self.stop, self.other = stop, other
        self.signal_during: int | None = None

    def max_int(self, value: int) -> int:
        if self.signal_during is not None:
            self.stop[0].on_signal(self.signal_during, None)
            self.signal_during = None
        return max(value, self.other)


def test_a_signal_that_arrives_while_the_ranks_agree_is_kept_for_the_next_step() -> None:
    stops: list[StopSignals] = []
    world = RaceWorld(stops)
    stops.append(StopSignals(world))
    world.signal_during = signal.SIGTERM  # this rank sent 0; the other rank too
    assert stops[0].agreed() is None  # nobody had it when the values were sent...
    assert stops[0].agreed() == signal.SIGTERM  # ...so every rank stops a step later
    other_had_it = StopSignals(RaceWorld([], other=signal.SIGINT))
    assert other_had_it.agreed() == signal.SIGINT and other_had_it.received == signal.SIGINT


#: where kill_driver.py may kill a process (see there), and the largest N drawn for each:
#: a checkpoint calls torch.save once, os.fsync 3 times, os.replace twice and os.link once,
#: and a (re)started run writes experiment.toml and tokenizer.json (2 fsyncs, 1 replace each)
KILL_POINTS = {"save": 12, "fsync": 40, "replace": 26, "link": 12}
KILL_DRIVER = Path(__file__).with_name("kill_driver.py")


def child_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of the runs the SIGKILL test starts: one thread each (the same in
    every process, as bit-exactness needs), and Python's bytecode cached outside the source
    trees, so that each of two dozen starts does not compile torch again."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.getbasetemp() / "pycache")
    return env


def this_process_steps(log: Path) -> int:
    """train_step events logged since the last run_start."""
    count = 0
    for event in read_events(log) if log.exists() else []:
        if event["event"] == "run_start":
            count = 0
        count += event["event"] == "train_step"
    return count


def logged(run_dir: Path, name: str, key: str) -> list[tuple[int, float]]:
    """``(step, event[key])`` of every ``name`` event, in the order logged."""
    return [(e["step"], e[key]) for e in read_events(run_dir / "log.jsonl") if e["event"] == name]


@pytest.mark.slow
def test_the_resume_hint_works_as_printed(write_experiment, tmp_path) -> None:
    # started with overrides (one with a space): the hint repeats them, quoted, and the
    # command it prints, run by a shell as printed, finishes the run
    path = write_experiment(LONG)
    runs = tmp_path / "runs"
    sets = ["--set", "training.max_steps=300", "--set", "sampling.prompt=The end"]
    proc = start(path, *sets, "--runs-dir", str(runs), env=NO_UV)
    wait_for(lambda: list(runs.glob("*/checkpoints/step_20.pt")), proc=proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    (run_dir,) = runs.iterdir()
    hint = err.strip().split("; resume with: ")[1]
    assert hint == (f"{PYTHON_M} run {path} --set training.max_steps=300 "
                    f"--set 'sampling.prompt=The end' --resume {run_dir}")  # fmt: skip
    done = subprocess.run(hint, shell=True, env=NO_UV, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert checkpoint.load(run_dir)["step"] == 300


def test_the_resume_hint_starts_slmkit_as_the_user_did(tmp_path) -> None:
    run_dir = tmp_path / "runs" / "r 1"
    python = "python" if shutil.which("python") == sys.executable else sys.executable
    cases = {  # (argv[0], UV set) -> the start of the hint
        ("/home/u/.venv/bin/slmkit", False): "slmkit",
        ("/home/u/.venv/bin/slmkit", True): "uv run slmkit",
        ("/src/slmkit/__main__.py", False): f"{python} -m slmkit",
        ("/src/slmkit/__main__.py", True): f"uv run {python} -m slmkit",
    }
    for (argv0, uv), start_with in cases.items():
        environ = {"UV": "/usr/bin/uv"} if uv else {}
        assert launcher(argv0, environ) == start_with
        hint = resume_command("x.toml", ["a.b=1"], run_dir, argv0=argv0, environ=environ)
        assert hint == f"{start_with} run x.toml --set a.b=1 --resume '{run_dir}'"
        under_torchrun = resume_command("x.toml", [], run_dir, torchrun=True, argv0=argv0,
                                        environ=environ)  # fmt: skip
        assert under_torchrun == (("uv run " if uv else "") + "torchrun <the same options> "
                                  f"-m slmkit run x.toml --resume '{run_dir}'")  # fmt: skip


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(
    write_experiment, tmp_path, tmp_path_factory, capsys
) -> None:
    """Kill a run 20 times (seeded): every other kill from inside a file write, at a point
    drawn from KILL_POINTS; the others after a random number of steps, wherever the process
    then is (mostly checkpointing: it checkpoints every step). Resume after each. Every loss
    logged, by whichever process, and the final parameters must be those of a run never
    interrupted, to the bit, and no temporary file may be left."""
    max_steps = 400
    path = write_experiment({"training": {"max_steps": max_steps, "checkpoint_every": 1,
                                          "keep_checkpoints": 2, "eval_every": 50,
                                          "log_every": 1},
                             "sampling": {"every": 0}})  # fmt: skip
    env = child_env(tmp_path_factory)
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "slmkit", "run", str(path), "--runs-dir",
                           str(reference)], capture_output=True, timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (ref_dir,) = reference.iterdir()

    def launch(*args: str, kill_at: tuple[str, int] | None = None) -> subprocess.Popen[str]:
        driver = [str(KILL_DRIVER), kill_at[0], str(kill_at[1])] if kill_at else ["-m", "slmkit"]
        command = [sys.executable, *driver, "run", str(path), *args]
        return subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    rng = random.Random(1234)
    runs = tmp_path / "runs"
    proc = launch("--runs-dir", str(runs))
    wait_for(lambda: list(runs.glob("*/checkpoints/latest.pt")), proc=proc)
    (run_dir,) = runs.iterdir()
    kills: list[str] = []
    during_writes = 0
    for kill in range(20):
        if kill % 2:  # from inside a write
            point = rng.choice(sorted(KILL_POINTS))
            nth = rng.randint(1, KILL_POINTS[point])
            proc = launch("--resume", str(run_dir), kill_at=(point, nth))
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == -signal.SIGKILL, f"{point} #{nth}: {proc.returncode} {err}"
            kills.append(f"{point}#{nth}")
            during_writes += 1
            continue
        if kill:
            proc = launch("--resume", str(run_dir))
        steps = rng.randint(1, 10)
        wait_for(lambda: this_process_steps(run_dir / "log.jsonl") >= steps, proc=proc)  # noqa: B023
        time.sleep(rng.uniform(0.0, 0.02))
        proc.kill()
        proc.wait()
        kills.append(f"step+{steps}")
        during_writes += any(run_dir.rglob(".*.tmp"))
        checkpoint.load_newest_good(run_dir)  # something loadable always remains
    proc = launch("--resume", str(run_dir))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    ref, got = final_parameters(ref_dir), final_parameters(run_dir)
    mismatches = sum(not torch.equal(ref[k], got[k]) for k in ref)
    expected = dict(logged(ref_dir, "train_step", "train_loss"))
    losses = logged(run_dir, "train_step", "train_loss")
    wrong = [
        (step, loss, expected.get(step)) for step, loss in losses if expected.get(step) != loss
    ]
    expected_val = dict(logged(ref_dir, "eval", "val_loss"))
    val_losses = logged(run_dir, "eval", "val_loss")
    with capsys.disabled():
        print(
            f"\nSIGKILL fault injection: {len(kills)} kills ({', '.join(kills)}), "
            f"{during_writes} during file writes; {len(losses)} losses logged for "
            f"{max_steps} steps, {len(wrong)} differ; mismatching tensors: {mismatches}"
        )
    assert len(kills) == 20 and during_writes >= 10
    assert mismatches == 0
    assert wrong == []
    assert {step for step, _ in losses} == set(expected) == set(range(1, max_steps + 1))
    assert all(expected_val[step] == loss for step, loss in val_losses)
    assert {step for step, _ in val_losses} == set(expected_val)
    assert [p.name for p in run_dir.rglob("*.tmp")] == []
    assert checkpoint.load(run_dir)["step"] == max_steps


# -- damaged and hostile checkpoints --------------------------------------------------------


@pytest.fixture
def finished_run(write_experiment, manager, tmp_path) -> tuple[Path, Path]:
    """A 6-step run with checkpoints at steps 3 and 6 (and latest = 6)."""
    path = write_experiment()
    run_dir = Path(trainer(path, tmp_path / "runs", manager).run()["run_dir"])
    return path, run_dir


def truncate(path: Path) -> None:
    data = path.read_bytes()
    os.unlink(path)  # latest.pt is a hard link: damage only this name
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    os.unlink(path)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_byte])
def test_a_damaged_checkpoint_is_detected(finished_run, damage) -> None:
    _, run_dir = finished_run
    latest = run_dir / "checkpoints" / "latest.pt"
    damage(latest)
    with pytest.raises(CheckpointError, match=r"latest.pt: (not a loadable|checksum mismatch)"):
        checkpoint.load(latest)


def test_resume_falls_back_to_the_newest_good_checkpoint(finished_run, manager, tmp_path):
    path, run_dir = finished_run
    flip_byte(run_dir / "checkpoints" / "latest.pt")
    truncate(run_dir / "checkpoints" / "step_6.pt")
    said = []
    console = Console(quiet=True)
    console.say = said.append  # type: ignore[method-assign]
    exp = load_experiment(path, manager)
    resumed = Trainer(exp, manager, str(path), resume=run_dir, console=console)
    assert resumed.resume.path == run_dir / "checkpoints" / "step_3.pt"
    assert resumed.state.step == 0  # restored when the run starts
    assert any("checksum mismatch" in line for line in said)
    assert (
        said[-1]
        == f"resuming from {run_dir / 'checkpoints' / 'step_3.pt'}, the newest good checkpoint"
    )
    resumed.run()
    full = Path(trainer(path, tmp_path / "full", manager).run()["run_dir"])
    assert_equal_parameters(final_parameters(run_dir), final_parameters(full))


def test_an_explicit_damaged_checkpoint_gets_no_fallback(finished_run, capsys) -> None:
    path, run_dir = finished_run
    truncate(run_dir / "checkpoints" / "latest.pt")
    assert main(["run", str(path), "--resume", str(run_dir / "checkpoints" / "latest.pt")]) == 2
    assert "not a loadable slmkit checkpoint" in capsys.readouterr().err


def test_files_that_are_no_checkpoint_say_why_in_one_line(tmp_path, capsys) -> None:
    text, raw_pickle = tmp_path / "notes.pt", tmp_path / "raw.pt"
    text.write_text("hello\n")
    raw_pickle.write_bytes(pickle.dumps({1: 2}, protocol=4))
    assert main(["eval", str(text)]) == 2
    assert main(["sample", str(raw_pickle)]) == 2
    first, second = capsys.readouterr().err.splitlines()  # one line each, no warning
    assert first == (f"slmkit: error: {text}: not a loadable slmkit checkpoint (not a file "
                     "torch.save wrote, or one cut short)")  # fmt: skip
    refused = f"slmkit: error: {raw_pickle}: not a loadable slmkit checkpoint (refused by the "
    refused += "weights-only loader, which never runs code: "
    assert second.startswith(refused) and len(second) > len(refused) + 1  # a reason is given


class Payload:
    """Unpickling this object runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_and_its_payload_never_runs(tmp_path, capsys) -> None:
    marker = tmp_path / "payload-ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": 1, "step": 1, "model": Payload(marker), "experiment": {},
                "tokenizer": {}}, hostile)  # fmt: skip
    with pytest.raises(CheckpointError, match="not a loadable slmkit checkpoint"):
        checkpoint.load(hostile)
    assert main(["sample", str(hostile)]) == 2
    assert main(["eval", str(hostile)]) == 2
    err = capsys.readouterr().err
    assert "refused by the weights-only loader, which never runs code" in err
    assert "GLOBAL posix.system" in err
    assert not marker.exists()


# -- non-finite training -------------------------------------------------------------------


class PoisonGradients:
    """An update hook that makes every gradient NaN at one step."""

    def __init__(self, options) -> None:
        pass

    def apply(self, parameters, step, log):
        if step == 3:
            for _, p in parameters:
                p.grad.fill_(float("nan"))


class Poison:
    @slmkit.hookimpl
    def register_update_hooks(self, register):
        register("poison", PoisonGradients)


def poisoned(write_experiment, mode: str) -> tuple[Path, PluginManager]:
    manager = PluginManager(entry_points=False).load()
    manager.add(Poison(), "poison-plugin")
    path = write_experiment({
        "plugins": {"enable": ["poison-plugin"]},
        "training": {"checkpoint_every": 2, "on_nonfinite": mode},
        "update_hooks": [{"name": "poison"}],
    })  # fmt: skip
    return path, manager


def test_nonfinite_stop_names_the_step_and_keeps_the_checkpoint(write_experiment, tmp_path):
    path, manager = poisoned(write_experiment, "stop")
    runs = tmp_path / "runs"
    with pytest.raises(RunError) as caught:
        trainer(path, runs, manager).run()
    (run_dir,) = runs.iterdir()
    latest = run_dir / "checkpoints" / "latest.pt"
    assert str(caught.value) == (
        f"non-finite loss or gradient at step 3: stopped (the last checkpoint, {latest}, is "
        'intact); training.on_nonfinite = "skip" would skip such steps instead'
    )
    saved = checkpoint.load(latest)
    assert saved["step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    assert read_events(run_dir / "log.jsonl")[-1]["event"] == "run_failed"


def test_nonfinite_skip_skips_that_update_and_counts_it(write_experiment, tmp_path) -> None:
    path, manager = poisoned(write_experiment, "skip")
    summary = trainer(path, tmp_path / "runs", manager).run()
    run_dir = Path(summary["run_dir"])
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    skipped = [e for e in read_events(run_dir / "log.jsonl") if e["event"] == "nonfinite_skipped"]
    assert [(e["step"], e["skipped_steps"]) for e in skipped] == [(3, 1)]
    assert all(torch.isfinite(t).all() for t in final_parameters(run_dir).values())


class Spike:
    """A schedule plugin: an infinite learning rate at step ``at``, whose update makes the
    weights non-finite although its loss and gradients are finite."""

    def __init__(self, at: int) -> None:
        self.at = at

    @slmkit.hookimpl
    def register_schedules(self, register) -> None:
        register("spike", lambda options, max_steps: self.multiplier)

    def multiplier(self, step: int) -> float:
        return float("inf") if step + 1 == self.at else 1.0  # schedules count from 0


class AfterEachStep:
    """A plugin that copies the weights and the optimizer's state after every step."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.saved: dict[int, tuple[dict, dict]] = {}

    @slmkit.hookimpl
    def on_step_end(self, step: int) -> None:
        assert self.trainer is not None
        model = {k: v.clone() for k, v in self.trainer.model.state_dict().items()}
        state = self.trainer.optimizer.state_dict()["state"]
        moments = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                   for i, s in state.items()}  # fmt: skip
        self.saved[step] = (model, moments)


def same_values(a, b) -> bool:
    """Nested dicts and tuples of tensors and plain values, equal to the bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


def spiked(write_experiment, mode: str, at: int) -> tuple[Path, PluginManager]:
    manager = PluginManager(entry_points=False).load()
    manager.add(Spike(at), "spike-plugin")
    path = write_experiment({
        "plugins": {"enable": ["spike-plugin"]},
        "schedule": {"name": "spike"},
        "training": {"checkpoint_every": 2, "on_nonfinite": mode},
    })  # fmt: skip
    return path, manager


def test_weights_made_non_finite_by_an_update_are_never_checkpointed(write_experiment, tmp_path):
    path, manager = spiked(write_experiment, "stop", at=4)
    runs = tmp_path / "runs"
    with pytest.raises(RunError) as caught:
        trainer(path, runs, manager).run()
    (run_dir,) = runs.iterdir()
    folder = run_dir / "checkpoints"
    message = str(caught.value)
    assert re.fullmatch(
        re.escape("non-finite weights at step 4 (tok_emb.weight and ")
        + r"\d+"
        + re.escape(
            f" more): {folder / 'step_4.pt'} not written (the last checkpoint, "
            f"{folder / 'latest.pt'}, is intact); "
            'training.on_nonfinite = "skip" would undo such updates instead'
        ),
        message,
    ), message
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step_2.pt"]
    saved = checkpoint.load(folder / "latest.pt")
    assert saved["step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    failed = read_events(run_dir / "log.jsonl")[-1]
    assert (failed["event"], failed["step"], failed["error"]) == ("run_failed", 4, message)


@pytest.mark.parametrize("cause", ["loss or gradient", "weights after the update"])
def test_a_skipped_update_leaves_weights_and_optimizer_moments_as_they_were(
    write_experiment, tmp_path, cause
) -> None:
    if cause == "loss or gradient":  # NaN gradients: the optimizer never steps
        path, manager = poisoned(write_experiment, "skip")
    else:  # finite gradients, non-finite weights after the step: the update is undone
        path, manager = spiked(write_experiment, "skip", at=3)
    watch = AfterEachStep()
    manager.add(watch, "watch-plugin")
    enable = [*load_experiment(path, manager).plugins.enable, "watch-plugin"]
    exp = load_experiment(path, manager, [f"plugins.enable={enable!r}"])
    run = Trainer(exp, manager, str(path), runs_dir=tmp_path / "runs", console=Console(quiet=True))
    watch.trainer = run
    summary = run.run()
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    run_dir = Path(summary["run_dir"])
    events = read_events(run_dir / "log.jsonl")
    skipped = [(e["step"], e["skipped_steps"], e["cause"])
               for e in events if e["event"] == "nonfinite_skipped"]  # fmt: skip
    assert skipped == [(3, 1, cause)]
    # step 3 changed nothing: the weights and AdamW's moments and step counts are step 2's
    assert same_values(watch.saved[3], watch.saved[2])
    assert watch.saved[2][1] and not same_values(watch.saved[4], watch.saved[3])
    assert int(watch.saved[4][1][0]["step"]) == 3  # AdamW counted the three applied updates
    assert all(torch.isfinite(t).all() for t in final_parameters(run_dir).values())


def test_eval_and_sample_refuse_a_model_with_non_finite_weights(finished_run, tmp_path, capsys):
    _, run_dir = finished_run
    payload = checkpoint.load(run_dir)
    payload["model"]["blocks.1.mlp.fc.weight"][0, 0] = float("nan")
    broken = tmp_path / "broken.pt"
    checkpoint.atomic_save(payload, broken)  # a sound file (checksum and all) of a NaN model
    for command in ("eval", "sample"):
        assert main([command, str(broken), "--device", "cpu"]) == 2
        assert capsys.readouterr().err == (
            f"slmkit: error: {broken}: its weights are not finite (blocks.1.mlp.fc.weight)\n"
        )


def test_a_diverging_learning_rate_stops_the_run(write_experiment, manager, tmp_path) -> None:
    path = write_experiment({"optimizer": {"learning_rate": 1e30},
                             "training": {"max_steps": 30}})  # fmt: skip
    with pytest.raises(RunError, match=r"non-finite loss or gradient at step \d+: stopped"):
        trainer(path, tmp_path / "runs", manager).run()


# -- full disks ----------------------------------------------------------------------------


def test_a_full_disk_while_checkpointing_is_reported_and_loses_nothing(
    write_experiment, manager, tmp_path, monkeypatch
) -> None:
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    runs = tmp_path / "runs"
    with pytest.raises(RunError) as caught:
        trainer(write_experiment(), runs, manager).run()
    (run_dir,) = runs.iterdir()
    folder = run_dir / "checkpoints"
    assert str(caught.value) == (
        f"could not write checkpoint {folder / 'step_6.pt'}: [Errno 28] No space left on "
        f"device; the last checkpoint, {folder / 'latest.pt'}, is intact"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step_3.pt"]
    assert checkpoint.load(folder / "latest.pt")["step"] == 3


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system (tmpfs) that can fill up; skipped where mounting is refused."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


class FillDisk:
    """A plugin that fills ``folder``'s file system right after the checkpoint of step
    ``at``, leaving ``room`` bytes: enough for the log, too few for another checkpoint."""

    def __init__(self, folder: Path, at: int, room: int) -> None:
        self.folder, self.at, self.room = folder, at, room

    @slmkit.hookimpl
    def on_checkpoint(self, step: int) -> None:
        if step != self.at:
            return
        filler = self.folder / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while f.write(b"\0" * 65536):
                pass
        os.truncate(filler, max(0, filler.stat().st_size - self.room))


def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_last_checkpoint(
    write_experiment, small_tmpfs, monkeypatch, capsys
) -> None:
    manager = PluginManager(entry_points=False).load()
    manager.add(FillDisk(small_tmpfs, at=3, room=64 * 1024), "fill-disk")
    monkeypatch.setattr("slmkit.cli._manager", lambda: manager)
    path = write_experiment({"plugins": {"enable": ["fill-disk"]}})
    runs = small_tmpfs / "runs"
    assert main(["run", str(path), "--runs-dir", str(runs)]) == 1
    (run_dir,) = runs.iterdir()
    folder = run_dir / "checkpoints"
    error = (
        f"could not write checkpoint {folder / 'step_6.pt'}: [Errno 28] No space left on "
        f"device; the last checkpoint, {folder / 'latest.pt'}, is intact"
    )
    assert capsys.readouterr().err == f"slmkit: error: {error}\n"
    # no temporary file left, the previous checkpoint whole
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step_3.pt"]
    assert [p.name for p in run_dir.rglob(".*")] == []
    assert checkpoint.load(folder / "latest.pt")["step"] == 3
    failed = read_events(run_dir / "log.jsonl")[-1]
    assert (failed["event"], failed["step"], failed["error"]) == ("run_failed", 6, error)
    (record,) = list_runs(runs)
    assert (record.status, record.status_detail) == ("failed", error)


def test_a_bug_during_a_run_is_logged_as_run_failed(
    write_experiment, manager, tmp_path, monkeypatch, capsys
) -> None:
    def broken(self, run) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(Trainer, "_evaluate", broken)  # at step 3, before its checkpoint
    runs = tmp_path / "runs"
    assert main(["run", str(write_experiment()), "--runs-dir", str(runs)]) == 1
    assert capsys.readouterr().err == (
        "slmkit: internal error: ZeroDivisionError: division by zero "
        "(run again with --debug for the traceback)\n"
    )
    (run_dir,) = runs.iterdir()
    failed = read_events(run_dir / "log.jsonl")[-1]
    error = (
        "internal error: ZeroDivisionError: division by zero; no checkpoint had been written yet"
    )
    assert (failed["event"], failed["step"], failed["error"]) == ("run_failed", 3, error)
    (record,) = list_runs(runs)
    assert (record.status, record.status_detail) == ("failed", error)


def test_a_new_run_never_reuses_a_run_folder(write_experiment, manager, tmp_path, monkeypatch):
    path = write_experiment()
    first = Path(trainer(path, tmp_path / "runs", manager).run()["run_dir"])
    before = (first / "log.jsonl").read_bytes()
    # A name that is taken is drawn again...
    names = iter([first.name, first.name, "fresh-name"])
    monkeypatch.setattr("slmkit.rundir.new_run_id", lambda name: next(names))
    second = Path(trainer(path, tmp_path / "runs", manager).run()["run_dir"])
    assert second.name == "fresh-name"
    # ...and when every draw is taken, the run stops with one line, touching nothing.
    monkeypatch.setattr("slmkit.rundir.new_run_id", lambda name: first.name)
    with pytest.raises(RunError, match="cannot find a free run folder name"):
        trainer(path, tmp_path / "runs", manager).run()
    assert (first / "log.jsonl").read_bytes() == before
