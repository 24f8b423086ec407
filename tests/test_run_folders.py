"""Run folders: resume only into a real one, ``--init-from`` for a new run from a checkpoint,
temporary files of killed writes, read-only folders."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import events, train

from slmkit import checkpoint
from slmkit.cli import main
from slmkit.config.resolve import load_experiment
from slmkit.progress import Console
from slmkit.train import Trainer


@pytest.fixture
def finished(write_experiment, manager, tmp_path) -> tuple[Path, Path]:
    """A 6-step run: its experiment file and its folder (checkpoints at steps 3 and 6)."""
    path = write_experiment()
    return path, train(path, tmp_path / "runs", manager)


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- --resume continues only a run folder ---------------------------------------------------


@pytest.mark.parametrize("where", ["a file outside", "a folder that is no run folder"])
def test_resume_outside_a_run_folder_is_refused_and_writes_nothing(
    finished, tmp_path, capsys, where
) -> None:
    path, run_dir = finished
    # what --resume used to treat as a run folder: the checkpoint's grandparent
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "checkpoints").mkdir(parents=True)
    (elsewhere / "notes.txt").write_text("mine\n")
    if where == "a file outside":
        (elsewhere / "models").mkdir()
        target = elsewhere / "models" / "model.pt"
        shutil.copy(run_dir / "checkpoints" / "latest.pt", target)
    else:  # checkpoints/latest.pt, but no experiment.toml nor log.jsonl
        shutil.copy(run_dir / "checkpoints" / "latest.pt", elsewhere / "checkpoints" / "latest.pt")
        target = elsewhere
    before = files_in(tmp_path / "elsewhere")
    assert main(["run", str(path), "--resume", str(target)]) == 2
    assert capsys.readouterr().err == (
        f"slmkit: error: {target}: not a run folder nor a checkpoint in one (a run folder holds "
        "experiment.toml, log.jsonl and checkpoints/); --resume continues a run in its own "
        f"folder, --init-from {target} starts a new run from its weights\n"
    )
    assert files_in(tmp_path / "elsewhere") == before


def test_resume_of_a_checkpoint_file_in_its_run_folder_continues_that_run(
    finished, manager, tmp_path
) -> None:
    path, run_dir = finished
    step_3 = run_dir / "checkpoints" / "step_3.pt"
    exp = load_experiment(path, manager, ["training.max_steps=7"])
    summary = Trainer(exp, manager, str(path), resume=step_3, console=Console(quiet=True)).run()
    assert Path(summary["run_dir"]) == run_dir.resolve()
    assert [e["resumed_from_step"] for e in events(run_dir, "run_start")] == [None, 3]
    assert summary["steps"] == 7


# -- --init-from: a new run from a checkpoint's weights --------------------------------------


def test_init_from_starts_a_new_run_with_the_weights_only(finished, manager, tmp_path) -> None:
    path, run_dir = finished
    source_before = files_in(run_dir)
    latest = run_dir / "checkpoints" / "latest.pt"
    exp = load_experiment(path, manager, ["training.max_steps=2"])
    new = Trainer(exp, manager, str(path), init_from=run_dir, runs_dir=tmp_path / "new",
                  console=Console(quiet=True))  # fmt: skip
    trained = checkpoint.load(latest)
    for name, tensor in new.model.state_dict().items():  # the weights, to the bit
        assert torch.equal(tensor, trained["model"][name]), name
    assert new.optimizer.state_dict()["state"] == {}  # a fresh optimizer
    summary = new.run()
    new_dir = Path(summary["run_dir"])
    assert new_dir.parent == tmp_path / "new" and summary["steps"] == 2
    (start,) = events(new_dir, "run_start")
    assert (start["init_from"], start["resumed_from_step"]) == (str(latest), None)
    saved = checkpoint.load(new_dir)
    assert saved["step"] == 2 and int(saved["optimizer"]["state"][0]["step"]) == 2
    assert saved["tokenizer"] == trained["tokenizer"]
    assert [e["step"] for e in events(new_dir, "train_step")] == [1, 2]
    assert files_in(run_dir) == source_before  # the source run is untouched


def test_init_from_a_model_of_other_shapes_is_refused_naming_a_tensor(
    finished, tmp_path, capsys
) -> None:
    path, run_dir = finished
    runs = tmp_path / "new"
    args = ["run", str(path), "--runs-dir", str(runs), "--init-from", str(run_dir)]
    assert main([*args, "--set", "model.d_model=48"]) == 2
    err = capsys.readouterr().err
    latest = run_dir / "checkpoints" / "latest.pt"
    assert re.fullmatch(
        re.escape(f"slmkit: error: {latest}: its model does not fit this experiment's: ")
        + r"tok_emb\.weight is \[(\d+), 32\] there, \[\1, 48\] here \(and \d+ more tensors\)\n",
        err,
    ), err
    assert main([*args, "--set", "model.n_layers=3"]) == 2
    assert capsys.readouterr().err == (
        f"slmkit: error: {latest}: its model does not fit this experiment's: "
        "blocks.2.ln_1.weight only here (and 11 more tensors)\n"
    )
    assert not runs.exists()  # refused before any run folder


def test_init_from_with_another_tokenizer_or_with_resume_is_refused(
    finished, tmp_path, capsys
) -> None:
    path, run_dir = finished
    runs = tmp_path / "new"
    latest = run_dir / "checkpoints" / "latest.pt"
    args = ["run", str(path), "--runs-dir", str(runs), "--init-from", str(run_dir)]
    assert main([*args, "--set", "tokenizer.name=bpe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"slmkit: error: {latest}: its tokenizer differs from the experiment's in tokenizer.name"
    )
    assert err.endswith(
        "; --init-from needs the same tokenizer (the weights are indexed by its token ids)\n"
    )
    assert main([*args, "--resume", str(run_dir)]) == 2
    assert capsys.readouterr().err == (
        "slmkit: error: --resume continues a run in its folder, --init-from starts a new one: "
        "use one\n"
    )
    assert not runs.exists()


# -- temporary files of killed writes ---------------------------------------------------------


def test_a_resumed_run_removes_temporary_files_no_live_process_writes(finished, manager) -> None:
    path, run_dir = finished
    ended = subprocess.Popen(["true"])
    ended.wait()
    live = subprocess.Popen(["sleep", "300"])
    try:
        folder = run_dir / "checkpoints"
        orphans = [
            folder / f".step_9.pt.{ended.pid}.tmp",  # a killed checkpoint write
            folder / f".latest.pt.{ended.pid}.tmp",  # a killed point_latest
            run_dir / f".experiment.toml.{ended.pid}.tmp",
            # this process's id: it has written nothing yet, so the file is a dead one's
            folder / f".step_8.pt.{os.getpid()}.tmp",
        ]
        kept = [folder / f".step_7.pt.{live.pid}.tmp", run_dir / "notes.tmp", run_dir / ".x.tmp"]
        for file in orphans + kept:
            file.write_bytes(b"partial")
        said: list[str] = []
        console = Console(quiet=True)
        console.say = said.append  # type: ignore[method-assign]
        exp = load_experiment(path, manager, ["training.max_steps=7"])
        Trainer(exp, manager, str(path), resume=run_dir, console=console).run()
        assert [f.name for f in orphans if f.exists()] == []
        assert [f.name for f in kept if not f.exists()] == []
        assert "removed 4 temporary file(s) of killed writes" in said
    finally:
        live.kill()
        live.wait()


# -- read-only run folders --------------------------------------------------------------------


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[str]:
    """``folder`` made read-only; yields the error writing there gives.

    As root a read-only bind mount (root writes through permissions); else chmod.
    """
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield "Permission denied"
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)],
                            capture_output=True, text=True, check=False)  # fmt: skip
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {ro.stderr.strip()}")
        yield "Read-only file system"
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_resume_into_a_read_only_run_folder_is_one_line(finished, capsys) -> None:
    path, run_dir = finished
    before = files_in(run_dir)
    with read_only(run_dir) as why:
        code = main(["run", str(path), "--resume", str(run_dir), "--set", "training.max_steps=9"])
    assert code == 1
    assert capsys.readouterr().err == (
        f"slmkit: error: cannot write to the run folder {run_dir}: {why}\n"
    )
    assert files_in(run_dir) == before
