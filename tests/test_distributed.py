"""Data-parallel training under torchrun: 2 CPU ranks (gloo) against a single process.

The torchrun runs are subprocesses (``python -m torch.distributed.run --standalone``,
which picks a free port itself and needs no network) with one torch thread per rank, so
two ranks fit two cores.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slmkit import checkpoint
from slmkit.config.resolve import load_experiment
from slmkit.data import BatchStream, rank_share, validation_batches
from slmkit.distributed import World, is_lost_peer, timeout_s
from slmkit.errors import CheckpointError, SlmkitError, first_line
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.train import Trainer
from tests.conftest import run_cli

#: one thread per rank; no inherited torchrun variables from whoever runs the tests
ENV = {"OMP_NUM_THREADS": "1"}
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: dropout 0 so that a 2-rank run and a 1-process run agree to float rounding
EXACT = {
    "model": {"dropout": 0.0},
    "training": {
        "batch_size": 2,
        "grad_accum_steps": 2,
        "max_steps": 4,
        "eval_every": 2,
        "checkpoint_every": 2,
    },
    "sampling": {"every": 0},
    # update hooks see the averaged gradients; forward hooks watch rank 0's share
    "update_hooks": [{"name": "grad_stats"}],
    "forward_hooks": [{"name": "activation_stats", "every": 2}],
}


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "slmkit", *args]  # fmt: skip


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    return {**env, **ENV, **(extra or {})}


def torchrun(*args: str, cwd: Path, env: dict[str, str] | None = None, nproc: int = 2,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        torchrun_command(*args, nproc=nproc), cwd=cwd, env=environment(env), capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip


def train_losses(run_dir: Path) -> list[float]:
    return [e["train_loss"] for e in read_events(run_dir / "log.jsonl")
            if e["event"] == "train_step"]  # fmt: skip


def val_losses(run_dir: Path) -> list[float]:
    return [e["val_loss"] for e in read_events(run_dir / "log.jsonl") if e["event"] == "eval"]


def grad_norms(run_dir: Path) -> list[float]:
    return [e["metrics"]["total"] for e in read_events(run_dir / "log.jsonl")
            if e["event"] == "update_hook"]  # fmt: skip


# -- the pieces, in this process ------------------------------------------------------------


def test_a_rank_process_ends_with_its_code_after_atexit_handlers_and_flushed_output() -> None:
    # What a rank does at the end of `slmkit` (gloo's threads would race the teardown).
    script = (
        "import atexit, sys\n"
        "from slmkit.distributed import World, end_rank_process\n"
        "end_rank_process(0)  # no process group created: returns\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "World.created_group = True\n"
        "sys.stdout.write('buffered, ')\n"
        "end_rank_process(3)\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert (done.returncode, done.stdout) == (3, "buffered, atexit ran\n")


def test_a_process_without_torchrun_variables_is_a_single_process() -> None:
    world = World.from_env({})
    assert (world.rank, world.world_size, world.launched, world.is_main) == (0, 1, False, True)
    assert world.label == "" and world.all_true(False) is False and world.max_int(3) == 3
    assert world.gather("x") == ["x"] and world.from_main(lambda: 5) == 5
    launched = World.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (launched.rank, launched.world_size, launched.local_rank) == (1, 2, 1)
    assert launched.launched and not launched.is_main and launched.label == "rank 1: "
    with pytest.raises(SlmkitError, match="RANK"):
        World.from_env({"WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(SlmkitError, match="outside"):
        World.from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_the_timeout_comes_from_the_environment() -> None:
    assert timeout_s({}) == 300 and timeout_s({"SLMKIT_DIST_TIMEOUT_S": "12.5"}) == 12.5
    for bad in ("0", "-3", "soon"):
        with pytest.raises(SlmkitError, match="SLMKIT_DIST_TIMEOUT_S"):
            timeout_s({"SLMKIT_DIST_TIMEOUT_S": bad})


def test_a_lost_peer_is_told_from_a_bug() -> None:
    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:4999: "
        "Connection reset by peer. This is typically caused by a remote worker hanging"
    )
    assert is_lost_peer(gloo)
    assert first_line(gloo) == "Read error [127.0.0.1]:4999: Connection reset by peer"
    assert not is_lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_ranks_take_disjoint_shares_of_the_same_global_batches() -> None:
    tokens = torch.arange(11 * 9, dtype=torch.int16)  # 11 windows of 9 tokens
    whole = BatchStream(tokens, 8, 6, seed=3)
    ranks = [BatchStream(tokens, 8, 3, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):  # across epoch boundaries too (11 windows, 6 per draw)
        x, y = whole.next_batch()
        shares = [stream.next_batch() for stream in ranks]
        assert torch.equal(torch.cat([s[0] for s in shares]), x)
        assert torch.equal(torch.cat([s[1] for s in shares]), y)
    assert all(stream.state_dict() == whole.state_dict() for stream in ranks)


def test_each_rank_evaluates_a_share_of_the_validation_set() -> None:
    batches = validation_batches(torch.arange(7 * 5), 4, 4, 3)  # batches of 4, 3 windows
    shares = [rank_share(batches, r, 2) for r in (0, 1)]
    assert [len(x) for s in shares for x, _ in s] == [2, 2, 2, 1]
    together = torch.cat([torch.cat([x for x, _ in s]) for s in shares]).sort(dim=0).values
    assert torch.equal(together, torch.cat([x for x, _ in batches]).sort(dim=0).values)
    assert rank_share(batches, 0, 1) is batches


def test_resume_with_another_world_size_is_refused(write_experiment, manager, tmp_path) -> None:
    path = write_experiment({"training": {"max_steps": 2, "checkpoint_every": 2}})
    exp = load_experiment(path, manager)
    Trainer(exp, manager, str(path), runs_dir=tmp_path / "runs", console=Console(quiet=True)).run()
    (run_dir,) = (tmp_path / "runs").iterdir()
    payload = checkpoint.load(run_dir)
    assert "world_size" not in payload and "rng_per_rank" not in payload  # format unchanged
    two = run_dir / "checkpoints" / "step_9.pt"
    rngs = [payload["rng"], payload["rng"]]
    checkpoint.atomic_save({**payload, "world_size": 2, "rng_per_rank": rngs}, two)
    with pytest.raises(CheckpointError, match=r"2 rank\(s\), this one has 1"):
        Trainer(exp, manager, str(path), resume=two, console=Console(quiet=True))


# -- torchrun ------------------------------------------------------------------------------


def test_two_ranks_train_like_one_process_with_the_same_global_batch(
    write_experiment, manager, tmp_path: Path
) -> None:
    path = write_experiment(EXACT)
    ddp_runs, single_runs = tmp_path / "ddp", tmp_path / "single"
    done = torchrun("run", str(path), "--runs-dir", str(ddp_runs), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the same global batch in one process: 2 windows x 2 micro-batches x 2 ranks
    exp = load_experiment(path, manager, ["training.batch_size=4"])
    Trainer(exp, manager, str(path), runs_dir=single_runs, console=Console(quiet=True)).run()

    (run_dir,) = ddp_runs.iterdir()  # one run folder, written by rank 0 alone
    (single,) = single_runs.iterdir()
    assert train_losses(run_dir) == pytest.approx(train_losses(single), abs=1e-5)
    assert val_losses(run_dir) == pytest.approx(val_losses(single), abs=1e-5)
    # the update hook saw the gradient of the global batch: all-reduced and averaged
    assert len(grad_norms(run_dir)) == 4
    assert grad_norms(run_dir) == pytest.approx(grad_norms(single), rel=1e-4)
    files = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert files == {"experiment.toml", "log.jsonl", "tokenizer.json", "checkpoints/latest.pt",
                     "checkpoints/step_2.pt", "checkpoints/step_4.pt"}  # fmt: skip
    events = read_events(run_dir / "log.jsonl")
    names = [e["event"] for e in events]
    assert names.count("run_start") == 1 and names.count("train_step") == 4
    assert names.count("checkpoint") == 2 and names[-1] == "run_end"
    watched = [(e["step"], e["phase"]) for e in events if e["event"] == "forward_hook"]
    assert watched == [(2, "train"), (4, "train")]  # once each, by rank 0
    start = events[0]
    assert (start["world_size"], start["backend"]) == (2, "gloo")
    assert (start["batch_size_per_rank"], start["global_batch_size"]) == (2, 8)
    assert start["num_threads"] == 1
    single_start = read_events(single / "log.jsonl")[0]
    assert (single_start["world_size"], single_start["backend"]) == (1, None)
    assert done.stdout.count("finished") == 1  # only rank 0 talks

    payload = checkpoint.load(run_dir)
    assert payload["world_size"] == 2 and len(payload["rng_per_rank"]) == 2
    assert not any(k.startswith("module.") for k in payload["model"])
    # the final checkpoint loads in a single process: eval recomputes the last val loss
    evaluated = run_cli("eval", str(run_dir), "--json", cwd=tmp_path, env=ENV)
    assert evaluated.returncode == 0, evaluated.stderr
    assert '"val_tokens": 256' in evaluated.stdout  # 2 batches of 2 x 2 windows of 32
    val = float(re.search(r'"val_loss": ([0-9.]+)', evaluated.stdout).group(1))
    assert val == pytest.approx(val_losses(run_dir)[-1], abs=1e-6)
    sampled = run_cli("sample", str(run_dir), "--max-new-tokens", "5", cwd=tmp_path, env=ENV)
    assert sampled.returncode == 0, sampled.stderr


def test_a_world_too_large_for_the_data_is_a_clear_error(write_experiment, tmp_path) -> None:
    corpus = tmp_path / "small.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 6)  # 270 characters
    path = write_experiment({"data": {"corpus": "file", "path": str(corpus),
                                      "val_fraction": 0.3}})  # fmt: skip
    done = torchrun("run", str(path), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert done.returncode != 0
    assert (
        "tiny.toml: training.batch_size: 4 windows per rank x 2 ranks = 8 windows per global "
        "batch, but the training split has only 5 windows of 33 tokens"
    ) in done.stderr
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


DIE_PLUGIN = """
import os

import slmkit


class DieOnRank1:
    \"\"\"Ends the process of rank 1 abruptly at step 3, as a crash or an OOM kill would.\"\"\"

    def __init__(self, options):
        pass

    def apply(self, parameters, step, log):
        if step == 3 and os.environ.get("RANK") == "1":
            os._exit(3)


@slmkit.hookimpl
def register_update_hooks(register):
    register("die_on_rank_1", DieOnRank1)
"""


def install_die_plugin(root: Path) -> Path:
    """A plugin distribution on a path of its own, the way test_plugins.py fakes one."""
    info = root / "slmkit_die_test-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slmkit-die-test\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[slmkit]\nslmkit_die_test = slmkit_die_test\n")
    (root / "slmkit_die_test.py").write_text(DIE_PLUGIN)
    return root


def test_a_rank_that_dies_ends_the_run_naming_it(write_experiment, tmp_path: Path) -> None:
    site = install_die_plugin(tmp_path / "site")
    path = write_experiment({
        "plugins": {"enable": ["slmkit-die-test"]},
        "update_hooks": [{"name": "die_on_rank_1"}],
        "training": {"max_steps": 8, "checkpoint_every": 2, "eval_every": 0},
        "sampling": {"every": 0},
    })  # fmt: skip
    pythonpath = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    started = time.monotonic()
    done = torchrun("run", str(path), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path,
                    env={"PYTHONPATH": pythonpath})  # fmt: skip
    assert time.monotonic() - started < 120  # no waiting for a timeout
    assert done.returncode != 0
    output = done.stdout + done.stderr
    # torchrun's report names the rank that died and its exit code
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: 3", output), output[-3000:]
    # rank 0 says what happened in one line, and no traceback of its own
    (line,) = [ln for ln in output.splitlines() if ln.startswith("slmkit: error: rank 0:")]
    assert "lost contact with the other ranks at step 3" in line
    assert "latest.pt, is intact" in line and "[rank0]: Traceback" not in output
    (run_dir,) = (tmp_path / "runs").iterdir()
    failed = [e for e in read_events(run_dir / "log.jsonl") if e["event"] == "run_failed"]
    assert len(failed) == 1 and failed[0]["step"] == 3
    assert checkpoint.load(run_dir)["step"] == 2  # the last checkpoint is intact


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_bit_exactly(write_experiment, tmp_path: Path) -> None:
    # dropout 0.1 (TINY's): every rank's RNG state must come back exactly
    training = {"max_steps": 200, "checkpoint_every": 10, "eval_every": 50, "log_every": 10}
    long = {"training": training, "sampling": {"every": 0}}
    path = write_experiment(long)
    whole_runs, cut_runs = tmp_path / "whole", tmp_path / "cut"
    done = torchrun("run", str(path), "--runs-dir", str(whole_runs), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(
        torchrun_command("run", str(path), "--runs-dir", str(cut_runs)), cwd=tmp_path,
        env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not list(cut_runs.glob("*/checkpoints/step_10.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    (run_dir,) = cut_runs.iterdir()
    events = read_events(run_dir / "log.jsonl")
    stops = [e for e in events if e["event"] == "run_interrupted"]
    assert len(stops) == 1, ([e["event"] for e in events[-3:]], err[-2000:])
    assert 10 <= stops[0]["step"] < 200, (stops, err[-2000:])
    uv = "uv run " if environment().get("UV") else ""  # the ranks were started by uv too
    resume = f"resume with: {uv}torchrun <the same options> -m slmkit run {path} --resume {run_dir}"
    assert resume in err

    # a single process may not resume it (the global batch would change)...
    refused = run_cli("run", str(path), "--resume", str(run_dir), cwd=tmp_path, env=ENV)
    assert refused.returncode == 2 and "2 rank(s), this one has 1" in refused.stderr
    # ...the same torchrun command may, and ends where the uninterrupted run ended
    resumed = torchrun("run", str(path), "--resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (whole,) = whole_runs.iterdir()
    a, b = checkpoint.load(whole)["model"], checkpoint.load(run_dir)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(run_dir) == train_losses(whole)  # bit for bit, step by step
    ended = checkpoint.load(run_dir)
    assert ended["step"] == 200 and ended["world_size"] == 2


@pytest.mark.slow
def test_one_rank_under_torchrun_is_bit_identical_to_one_process(
    write_experiment, tmp_path: Path
) -> None:
    path = write_experiment()  # dropout 0.1
    done = torchrun("run", str(path), "--runs-dir", str(tmp_path / "one"), cwd=tmp_path,
                    nproc=1)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    plain = run_cli("run", str(path), "--runs-dir", str(tmp_path / "plain"), cwd=tmp_path, env=ENV)
    assert plain.returncode == 0, plain.stderr
    (one,) = (tmp_path / "one").iterdir()
    (single,) = (tmp_path / "plain").iterdir()
    assert read_events(one / "log.jsonl")[0]["backend"] == "gloo"
    assert train_losses(one) == train_losses(single)
    a, b = checkpoint.load(one)["model"], checkpoint.load(single)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # world size 1 either way: a plain process resumes the torchrun run
    resumed = run_cli("run", str(path), "--resume", str(one), "--set", "training.max_steps=7",
                      cwd=tmp_path, env=ENV)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_resume_from_rank_0s_folder_alone(write_experiment, tmp_path) -> None:
    """Two torchrun agents (one rank each) in two folders, as on two machines."""
    path = write_experiment({"sampling": {"every": 0}})
    machines = [tmp_path / "machine0", tmp_path / "machine1"]

    def launch(*args: str) -> None:
        port = free_port()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                 "--nproc_per_node=1", f"--node-rank={node}", "--master-addr=127.0.0.1",
                 f"--master-port={port}", "-m", "slmkit", "run", str(path), *args],
                cwd=folder, env=environment(), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )
            for node, folder in enumerate(machines)
        ]  # fmt: skip
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]

    for folder in machines:
        folder.mkdir()
    launch("--runs-dir", "runs", "--set", "training.max_steps=3")
    assert not (machines[1] / "runs").exists()  # only rank 0's machine has the run folder
    (run_dir,) = (machines[0] / "runs").iterdir()
    # machine 1 has no such folder: rank 0 reads the checkpoint and sends it over
    launch("--resume", str(run_dir.relative_to(machines[0])))
    assert checkpoint.load(run_dir)["step"] == 6
    assert [e["step"] for e in read_events(run_dir / "log.jsonl")
            if e["event"] == "train_step"] == [1, 2, 3, 4, 5, 6]  # fmt: skip
