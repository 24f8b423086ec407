"""Faults injected on purpose: signals, kills, damaged and hostile files, NaNs, full disks."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slmkit
from slmkit import checkpoint
from slmkit.cli import main
from slmkit.config.resolve import load_experiment
from slmkit.errors import CheckpointError, RunError
from slmkit.plugins import PluginManager
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.signals import launcher, resume_command
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
def test_sigkill_at_random_moments_loses_nothing(write_experiment, tmp_path, capsys) -> None:
    """Kill a run again and again, some kills landing inside checkpoint writes; resume each
    time; the end result must equal an uninterrupted run's, to the bit."""
    path = write_experiment({"training": {"max_steps": 250, "checkpoint_every": 1,
                                          "keep_checkpoints": 2, "eval_every": 0,
                                          "log_every": 25},
                             "sampling": {"every": 0}})  # fmt: skip
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "slmkit", "run", str(path), "--runs-dir",
                           str(reference)], capture_output=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rng = random.Random(1234)
    runs = tmp_path / "runs"
    kills = during_writes = resumes = 0
    proc = start(path, "--runs-dir", str(runs))
    wait_for(lambda: list(runs.glob("*/checkpoints/latest.pt")), proc=proc)
    (run_dir,) = runs.iterdir()
    folder = run_dir / "checkpoints"
    while kills < 12:
        if kills % 2:  # aim at a checkpoint being written
            try:
                wait_for(lambda: any(folder.glob(".*.tmp")), timeout=5, proc=proc, interval=0.0002)
            except AssertionError:
                if proc.poll() is not None:
                    break
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break
        during_writes += any(folder.glob(".*.tmp"))
        proc.kill()
        proc.wait()
        kills += 1
        checkpoint.load_newest_good(run_dir)  # something loadable always remains
        proc = start(path, "--resume", str(run_dir))
        resumes += 1
    assert proc.wait(timeout=600) == 0, proc.stderr.read() if proc.stderr else ""
    (ref_dir,) = reference.iterdir()
    ref, got = final_parameters(ref_dir), final_parameters(run_dir)
    mismatches = sum(not torch.equal(ref[k], got[k]) for k in ref)
    with capsys.disabled():
        print(f"\nSIGKILL fault injection: kills={kills} (during checkpoint writes: "
              f"{during_writes}) resumes={resumes} mismatching tensors={mismatches}")  # fmt: skip
    assert kills >= 10 and mismatches == 0
    assert checkpoint.load(run_dir)["step"] == 250


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
