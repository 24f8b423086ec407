"""Data-parallel throughput: 1 process vs torchrun with 1 and 2 ranks, in tokens/s.

Each contender trains ``experiments/quick.toml`` (835 k parameters, 16 windows of 128
tokens per rank and step; no evaluation, samples or checkpoints until the last step) as
a subprocess, the way a user runs it:

* ``1 process, T threads``: ``python -m slmkit run`` with torch's default threads;
* ``1 process, 1 thread``: the same with ``OMP_NUM_THREADS=1``;
* ``torchrun 1 rank``: ``python -m torch.distributed.run --standalone --nproc_per_node=1``,
  one thread (DDP over gloo with nobody to talk to: the cost of the wrapper alone);
* ``torchrun 2 ranks``: ``--nproc_per_node=2``, one thread per rank; the global batch is
  twice as large (``batch_size`` is per rank), so the same steps carry twice the tokens.

tokens/s is the global rate the run logs (all ranks together), median (min–max) over the
``train_step`` windows of every round after the first window of each run (start-up).
Rounds interleave the contenders. On a 2-core machine, 2 ranks can at best double the
1-thread rate and cannot beat one process using both cores by much: the figure shows the
cost of gradient all-reduces and of running two processes.

    uv run python -m bench distributed [--quick | --smoke] [--steps N] [--rounds R] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import ROOT, fmt_spread, machine_line, parse_args, spread, table
from bench.training import result_name, save_results, shown

EXPERIMENT = "experiments/quick.toml"
SMOKE_OVERRIDES = ("model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                   "model.d_ff=64", "model.context_length=32", "training.batch_size=4")  # fmt: skip
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def contenders() -> list[tuple[str, list[str], dict[str, str], int]]:
    """``(label, command prefix, extra environment, ranks)`` of each configuration."""
    slmkit = [sys.executable, "-m", "slmkit", "run"]

    def torchrun(n: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={n}", "-m", "slmkit", "run"]  # fmt: skip

    one = {"OMP_NUM_THREADS": "1"}
    threads = os.cpu_count() or 1
    return [
        (f"1 process, {threads} threads", slmkit, {}, 1),
        ("1 process, 1 thread", slmkit, one, 1),
        ("torchrun 1 rank, 1 thread", torchrun(1), one, 1),
        ("torchrun 2 ranks, 1 thread each", torchrun(2), one, 2),
    ]


def run_once(command: list[str], env: dict[str, str], overrides: Sequence[str],
             workdir: Path) -> dict[str, Any]:  # fmt: skip
    """One training run; its logged tokens/s windows, wall time and final loss."""
    from slmkit.runlog import read_events

    runs = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    sets = [a for o in overrides for a in ("--set", o)]
    full_env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS} | env
    started = time.perf_counter()
    done = subprocess.run(
        [*command, str(ROOT / EXPERIMENT), *sets, "--runs-dir", str(runs)],
        cwd=ROOT, env=full_env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-8000:]}")
    (run_dir,) = runs.iterdir()
    events = read_events(run_dir / "log.jsonl")
    steps = [e for e in events if e["event"] == "train_step"]
    start = next(e for e in events if e["event"] == "run_start")
    end = next(e for e in events if e["event"] == "run_end")["summary"]
    return {
        "windows_tokens_per_s": [e["tokens_per_s"] for e in steps[1:]],  # first: start-up
        "wall_s": wall,
        "loop_s": end["elapsed_s"],
        "final_train_loss": steps[-1]["train_loss"],
        "global_batch": start["global_batch_size"],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every contender ``rounds`` times, print the table, write ``distributed*.json``."""
    parser = argparse.ArgumentParser(prog="bench.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one round")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps")
    parser.add_argument("--steps", type=int, default=None, help="default 60 (quick 30, smoke 4)")
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (quick, smoke 1)")
    parser.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    args = parse_args(parser, argv)
    steps = args.steps or (4 if args.smoke else 30 if args.quick else 60)
    rounds = args.rounds or (1 if args.smoke or args.quick else 2)
    log_every = 1 if args.smoke else 5
    overrides = [
        f"training.max_steps={steps}", f"training.log_every={log_every}",
        "training.eval_every=0", "training.eval_batches=1", "training.checkpoint_every=0",
        "sampling.every=0", "training.device=cpu", *(SMOKE_OVERRIDES if args.smoke else ()),
    ]  # fmt: skip
    print(machine_line())
    print(f"{EXPERIMENT} with {' '.join(overrides)}; {rounds} round(s), interleaved")

    found: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in contenders()}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        for round_no in range(rounds):
            for label, command, env, _ranks in contenders():
                result = run_once(command, env, overrides, Path(tmp))
                found[label].append(result)
                print(f"  round {round_no + 1}: {label}: {result['wall_s']:.1f} s wall", flush=True)

    rows, configs = [], {}
    for label, command, env, ranks in contenders():
        windows = [w for r in found[label] for w in r["windows_tokens_per_s"]]
        configs[label] = {
            "ranks": ranks,
            "env": env,
            "command": " ".join(Path(c).name if c == sys.executable else c for c in command),
            "global_batch": found[label][0]["global_batch"],
            "tokens_per_s": spread(windows),
            "wall_s": spread([r["wall_s"] for r in found[label]]),
            "loop_s": spread([r["loop_s"] for r in found[label]]),
            "final_train_loss": [r["final_train_loss"] for r in found[label]],
        }
        rows.append((label, configs[label]["global_batch"],
                     fmt_spread(configs[label]["tokens_per_s"], "{:,.0f}"),
                     fmt_spread(configs[label]["loop_s"], "{:.1f}"),
                     fmt_spread(configs[label]["wall_s"], "{:.1f}")))  # fmt: skip
    print(table(("configuration", "global batch", "tokens/s median (min–max)",
                 "loop s", "wall s (with start-up)"), rows))  # fmt: skip
    labels = list(configs)
    two, one_rank, one_thread, default = labels[3], labels[2], labels[1], labels[0]
    ratios = {
        "two_ranks_over_one_rank": configs[two]["tokens_per_s"]["median"]
        / configs[one_rank]["tokens_per_s"]["median"],
        "two_ranks_over_one_process_default_threads": configs[two]["tokens_per_s"]["median"]
        / configs[default]["tokens_per_s"]["median"],
        "one_rank_over_one_process_one_thread": configs[one_rank]["tokens_per_s"]["median"]
        / configs[one_thread]["tokens_per_s"]["median"],
    }
    for name, value in ratios.items():
        print(f"{name.replace('_', ' ')}: {value:.2f}x")
    data = {"config": {"experiment": EXPERIMENT, "overrides": overrides, "rounds": rounds},
            "configs": configs, "ratios": ratios}  # fmt: skip
    path = save_results(result_name("distributed", args), data, args.out)
    print(f"wrote {shown(path)}")
    return data
