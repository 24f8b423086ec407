"""Training runs end to end: the run folder, the log, determinism and bit-exact resume."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_parameters, events, losses, train

import slmkit
from slmkit import checkpoint
from slmkit.cli import main
from slmkit.config.resolve import load_experiment
from slmkit.errors import CheckpointError
from slmkit.evaluate import PREVIEW_CHARS, PREVIEW_INDENT, PREVIEW_LINES, sample_preview
from slmkit.plugins import PluginManager
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.train import Trainer

RUN_START_FIELDS = {
    "run_id", "timestamp", "git_commit", "git_dirty", "config_hash", "hook_list", "plugins",
    "torch_version", "device", "num_threads", "cpu_capability", "n_params", "seed", "corpus",
    "non_embedding_params", "max_steps_from_flops",
}  # fmt: skip


def parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir)["model"]


def test_a_run_writes_its_folder_and_log(write_experiment, manager, tmp_path: Path) -> None:
    run_dir = train(write_experiment(), tmp_path / "runs", manager)
    assert run_dir.parent == tmp_path / "runs"
    files = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert files == {
        "experiment.toml", "log.jsonl", "tokenizer.json", "checkpoints/latest.pt",
        "checkpoints/step_3.pt", "checkpoints/step_6.pt",
    }  # fmt: skip
    events = read_events(run_dir / "log.jsonl")
    names = [e["event"] for e in events]
    assert names[0] == "run_start" and names[-1] == "run_end"
    assert names.count("train_step") == 6 and names.count("eval") == 2
    assert names.count("sample") == 2 and names.count("checkpoint") == 2
    assert {e["run_id"] for e in events} == {run_dir.name}
    assert all(e["timestamp"].endswith("Z") for e in events)
    start = events[0]
    assert start.keys() >= RUN_START_FIELDS
    assert start["plugins"]["slmkit_builtin.gpt"] == slmkit.__version__
    assert start["hook_list"] == []
    assert start["corpus"]["name"] == "python_docs" and len(start["corpus"]["sha256"]) == 64
    assert start["n_params"] == sum(p.numel() for p in parameters(run_dir).values())
    tables = ("tok_emb.weight", "pos_emb.weight", "head.weight")  # vocabulary and positions
    assert start["non_embedding_params"] == sum(
        p.numel() for name, p in parameters(run_dir).items() if name not in tables
    )
    assert start["max_steps_from_flops"] is False
    evals = [e for e in events if e["event"] == "eval"]
    # bits per character of the raw corpus: loss / ln 2 x tokens per character
    tokens_per_char = (start["train_tokens"] + start["val_tokens"]) / start["corpus"]["chars"]
    expected_bpc = evals[0]["val_loss"] / math.log(2) * tokens_per_char
    assert evals[0]["val_bpc"] == pytest.approx(expected_bpc, rel=1e-12)
    resolved = load_experiment(run_dir / "experiment.toml", manager)
    assert resolved.config_hash == start["config_hash"]
    tokenizer = json.loads((run_dir / "tokenizer.json").read_text())
    assert tokenizer["name"] == "char" and len(tokenizer["state"]["tokens"]) == 99


def test_same_seed_same_losses_other_seed_differs(write_experiment, manager, tmp_path) -> None:
    path = write_experiment()
    a = train(path, tmp_path / "a", manager)
    b = train(path, tmp_path / "b", manager)
    c = train(path, tmp_path / "c", manager, ["experiment.seed=8"])
    assert losses(a) == losses(b)
    assert_same_parameters(a, b)
    assert [v for _, v in losses(a)] != [v for _, v in losses(c)]


def test_resume_is_bit_exact(write_experiment, manager, tmp_path: Path) -> None:
    path = write_experiment({"training": {"max_steps": 8, "checkpoint_every": 2}})
    full = train(path, tmp_path / "full", manager)
    half = train(path, tmp_path / "half", manager, ["training.max_steps=4"])
    assert [s for s, _ in losses(half)] == [1, 2, 3, 4]
    resumed = train(path, tmp_path / "unused", manager, resume=half)
    assert resumed == half
    assert losses(resumed) == losses(full)
    assert_same_parameters(resumed, full)
    full_opt, resumed_opt = checkpoint.load(full)["optimizer"], checkpoint.load(half)["optimizer"]
    for key, state in full_opt["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed_opt["state"][key][name]), (key, name)
    starts = [e for e in read_events(half / "log.jsonl") if e["event"] == "run_start"]
    assert [s["resumed_from_step"] for s in starts] == [None, 4]


def test_resume_refuses_a_changed_experiment(write_experiment, manager, tmp_path) -> None:
    path = write_experiment()
    run_dir = train(path, tmp_path / "runs", manager)
    exp = load_experiment(path, manager, ["model.dropout=0.2", "optimizer.weight_decay=0.0"])
    with pytest.raises(
        CheckpointError, match=r"differs .* in model.dropout, optimizer.weight_decay"
    ):
        Trainer(exp, manager, str(path), resume=run_dir, console=Console(quiet=True))


def test_resume_below_the_checkpoints_step_is_refused_and_rewrites_nothing(
    write_experiment, manager, tmp_path, capsys
) -> None:
    path = write_experiment()
    run_dir = train(path, tmp_path / "runs", manager)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code = main(["run", str(path), "--resume", str(run_dir), "--set", "training.max_steps=5"])
    assert code == 2
    latest = run_dir / "checkpoints" / "latest.pt"
    assert capsys.readouterr().err == (
        f"slmkit: error: {latest}: the checkpoint is at step 6, past training.max_steps = 5; "
        "resume with training.max_steps >= 6 (--set training.max_steps=N)\n"
    )
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_run_events_reach_participating_plugins(write_experiment, tmp_path) -> None:
    seen: list[tuple[Any, ...]] = []

    class Observer:
        @slmkit.hookimpl
        def on_run_start(self, run):
            seen.append(("start", run.run_id))

        @slmkit.hookimpl
        def on_step_end(self, step, metrics):
            seen.append(("step", step, "train_loss" in metrics))

        @slmkit.hookimpl
        def on_eval(self, step, metrics):
            seen.append(("eval", step, sorted(metrics)))

        @slmkit.hookimpl
        def on_checkpoint(self, step, path):
            seen.append(("checkpoint", step, Path(path).name))

        @slmkit.hookimpl
        def on_run_end(self, summary):
            seen.append(("end", summary["steps"]))

    manager = PluginManager(entry_points=False).load()
    manager.add(Observer(), "observer")
    path = write_experiment({"plugins": {"enable": ["observer"]},
                             "training": {"max_steps": 3, "log_every": 2}})  # fmt: skip
    run_dir = train(path, tmp_path / "runs", manager)
    assert seen == [
        ("start", run_dir.name),
        ("step", 1, False), ("step", 2, True), ("step", 3, True),
        ("eval", 3, ["val_bpc", "val_loss"]),
        ("checkpoint", 3, "step_3.pt"),
        ("end", 3),
    ]  # fmt: skip


def test_keep_checkpoints_prunes_old_ones(write_experiment, manager, tmp_path) -> None:
    path = write_experiment({"training": {"max_steps": 5, "checkpoint_every": 1,
                                          "keep_checkpoints": 2}})  # fmt: skip
    run_dir = train(path, tmp_path / "runs", manager)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest.pt", "step_4.pt", "step_5.pt"]
    assert checkpoint.load(run_dir)["step"] == 5


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(write_experiment, manager, tmp_path) -> None:
    changes = {"training": {"max_steps": 300, "checkpoint_every": 20, "eval_every": 0,
                            "log_every": 1}, "sampling": {"every": 0}}  # fmt: skip
    path = write_experiment(changes)
    runs = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "slmkit", "run", str(path), "--runs-dir", str(runs)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(runs.glob("*/checkpoints/step_40.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (killed,) = runs.iterdir()
    assert checkpoint.load(killed)["step"] < 300
    resumed = train(path, tmp_path / "unused", manager, resume=killed)
    full = train(path, tmp_path / "full", manager)
    # the killed run may have logged steps after its last checkpoint: keep the last record
    assert dict(losses(resumed)) == dict(losses(full))
    assert_same_parameters(resumed, full)


def test_resume_accepts_a_checkpoint_written_before_a_key_existed(
    write_experiment, manager, tmp_path
) -> None:
    path = write_experiment({"training": {"max_steps": 4, "checkpoint_every": 2}})
    run_dir = train(path, tmp_path / "runs", manager, ["training.max_steps=2"])
    latest = run_dir / "checkpoints" / "latest.pt"
    payload = checkpoint.load(latest)
    del payload["experiment"]["training"]["grad_accum_steps"]  # as an older slmkit wrote it
    latest.unlink()
    checkpoint.atomic_save(payload, latest)
    assert [s for s, _ in losses(train(path, tmp_path / "x", manager, resume=run_dir))] == [
        1, 2, 3, 4,
    ]  # fmt: skip


# -- samples on the console ------------------------------------------------------------------


def test_sample_preview_is_an_indented_block_cut_with_an_ellipsis() -> None:
    assert sample_preview("\nclass A:\n\tdef f(self):\r\n\n        return 1  \n") == (
        "    class A:\n        def f(self):\\r\n\n            return 1"
    )
    long_line = "x" * (PREVIEW_CHARS + 50)
    assert sample_preview(long_line) == PREVIEW_INDENT + "x" * PREVIEW_CHARS + "…"
    many = "\n".join(f"line {i}" for i in range(PREVIEW_LINES + 5))
    shown = sample_preview(many).split("\n")
    assert len(shown) == PREVIEW_LINES
    assert shown[-1] == f"{PREVIEW_INDENT}line {PREVIEW_LINES - 1}…"
    assert sample_preview("\n\n") == PREVIEW_INDENT + "(empty)"


def test_a_run_shows_its_samples_as_text_and_logs_them_whole(
    write_experiment, manager, tmp_path
) -> None:
    prompt = "class A:\n    def "
    path = write_experiment({"sampling": {"max_new_tokens": 80, "prompt": prompt}})
    out = io.StringIO()
    exp = load_experiment(path, manager)
    trainer = Trainer(exp, manager, str(path), runs_dir=tmp_path, console=Console(out))
    run_dir = Path(trainer.run()["run_dir"])
    printed = out.getvalue()
    for sample in events(run_dir, "sample"):
        text = prompt + sample["sample_text"]
        block = sample_preview(text)
        assert f"step {sample['step']}: sample:\n{block}\n" in printed
        # all of it (80 tokens are under both limits), on its own lines, nothing joined
        assert block.startswith(f"{PREVIEW_INDENT}class A:\n{PREVIEW_INDENT}    def ")
        assert "…" not in block
        assert block.count("\n") == text.strip("\n").count("\n") > 0
