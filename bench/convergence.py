"""Convergence: ``experiments/quick.toml`` trained on tinyshakespeare.

Runs the experiment through the Python API (``load_experiment`` + ``Trainer``, run folder
in a temporary directory) with

    --set data.corpus=file --set data.path=../shared/data/tinyshakespeare.txt

(the path is relative to the project root, which the benchmark makes the working
directory; the file is read in place), then reads the run's ``log.jsonl`` for the
validation loss at each evaluation, the training throughput and the last sample.
Target: final validation loss below 2.0 nats per character.

    uv run python -m bench convergence [--quick] [--set KEY=VALUE ...] [--tag NAME]

``--set`` adds overrides after the two above (e.g. ``--set training.max_steps=1200``);
``--tag`` writes ``bench/results/convergence-<tag>.json`` instead of ``convergence.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import (
    ROOT,
    TINYSHAKESPEARE,
    fmt_spread,
    machine_line,
    parse_args,
    spread,
    table,
    write_results,
)

EXPERIMENT = "experiments/quick.toml"
DATA_PATH = "../shared/data/tinyshakespeare.txt"
BASE_OVERRIDES = ("data.corpus=file", f"data.path={DATA_PATH}")
QUICK_OVERRIDES = ("training.max_steps=40", "training.eval_every=20", "sampling.every=0")
TARGET_VAL_LOSS = 2.0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, print the table, write ``bench/results/convergence[-TAG].json``."""
    parser = argparse.ArgumentParser(prog="bench.convergence", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 steps: a smoke test only")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra override"
    )
    parser.add_argument("--tag", default=None, help="suffix of the results file")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parse_args(parser, argv)

    import torch

    from slmkit.config.resolve import load_experiment
    from slmkit.plugins import PluginManager
    from slmkit.progress import Console
    from slmkit.runlog import read_events
    from slmkit.train import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # data.path is relative to the project root
    print(machine_line())
    if not TINYSHAKESPEARE.resolve().is_file():
        print(f"skipping: {TINYSHAKESPEARE.resolve()} is missing")
        return {}
    overrides = [*BASE_OVERRIDES, *(QUICK_OVERRIDES if args.quick else ()), *args.set]
    print(f"{EXPERIMENT} " + " ".join(f"--set {o}" for o in overrides))

    manager = PluginManager().load()
    with tempfile.TemporaryDirectory(prefix="slmkit-bench-conv-") as runs_dir:
        started = time.perf_counter()
        exp = load_experiment(EXPERIMENT, manager, overrides)
        trainer = Trainer(
            exp, manager, EXPERIMENT, runs_dir=runs_dir, console=Console(plain_interval=20.0)
        )
        setup_s = time.perf_counter() - started
        summary = trainer.run()
        wall_s = time.perf_counter() - started
        events = read_events(Path(summary["run_dir"]) / "log.jsonl")

    evals = [(e["step"], e["val_loss"], e["val_bpc"]) for e in events if e["event"] == "eval"]
    samples = [e for e in events if e["event"] == "sample"]
    window_tok_s = [e["tokens_per_s"] for e in events if e["event"] == "train_step"]
    final_loss = summary["val_loss"]
    met = final_loss is not None and final_loss < TARGET_VAL_LOSS
    t, m = exp.training, exp.model
    config = {
        "overrides": overrides,
        "max_steps": t.max_steps,
        "batch_size": t.batch_size,
        "context_length": m.context_length,
        "learning_rate": exp.optimizer.learning_rate,
        "n_params": trainer.model.n_params,
        "train_tokens": len(trainer.data.splits.train),
        "val_tokens": len(trainer.data.splits.val),
        "eval_tokens": sum(y.numel() for _, y in trainer.data.val_batches),
        "torch_threads": torch.get_num_threads(),
    }
    epochs = t.max_steps * t.batch_size / trainer.data.stream.n_windows

    print()
    print(
        table(
            ["", "value"],
            [
                ["steps", summary["steps"]],
                ["parameters", f"{config['n_params']:,}"],
                [
                    "tokens/step",
                    f"{t.batch_size} x {m.context_length} = {t.batch_size * m.context_length}",
                ],
                ["epochs of the training split", f"{epochs:.2f}"],
                ["setup s (read, encode, build)", f"{setup_s:.1f}"],
                ["training s (loop incl. evals, samples, checkpoints)", summary["elapsed_s"]],
                ["wall s (all)", f"{wall_s:.1f}"],
                ["tokens/s (whole loop)", summary["tokens_per_s"]],
                [
                    "tokens/s per log window, median (min–max)",
                    fmt_spread(spread(window_tok_s), "{:.0f}") if window_tok_s else "-",
                ],
                ["final train loss", f"{summary['train_loss']:.4f}"],
                ["final val loss (nats/char)", f"{final_loss:.4f}"],
                ["final val bits/char", f"{summary['val_bpc']:.4f}"],
                ["best val loss", f"{summary['best_val_loss']:.4f}"],
            ],
        )
    )
    print()
    print(
        table(
            ["step", "val loss (nats/char)", "bits/char"],
            [[s, f"{v:.4f}", f"{b:.4f}"] for s, v, b in evals],
        )
    )
    print(
        f"\ntarget: val loss < {TARGET_VAL_LOSS} nats/char: "
        + ("met" if met else "NOT met")
        + (" (quick smoke run: not meaningful)" if args.quick else "")
    )
    final_sample = samples[-1]["sample_text"] if samples else None
    if final_sample is not None:
        print(f"\nfinal sample (step {samples[-1]['step']}, prompt {samples[-1]['prompt']!r}):")
        print(final_sample)

    result = {
        "experiment": EXPERIMENT,
        "quick": args.quick,
        "config": config,
        "summary": {k: v for k, v in summary.items() if k != "run_dir"},
        "setup_s": setup_s,
        "wall_s": wall_s,
        "window_tokens_per_s": spread(window_tok_s) if window_tok_s else None,
        "evals": [{"step": s, "val_loss": v, "val_bpc": b} for s, v, b in evals],
        "samples": [{"step": e["step"], "text": e["sample_text"]} for e in samples],
        "target_val_loss": TARGET_VAL_LOSS,
        "target_met": met,
    }
    name = "convergence" + (f"-{args.tag}" if args.tag else "") + ("-quick" if args.quick else "")
    path = write_results(name, result)
    print(f"wrote {path.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
