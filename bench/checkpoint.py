"""Checkpoint cost: saving and loading the reference model's checkpoint, and its size.

A real :class:`slmkit.train.Trainer` of ``experiments/baseline.toml`` takes one training
step (so the AdamW state exists, as in any checkpoint a run writes), then each repeat
times, in this order:

* ``TrainState.payload`` (state dicts, RNG states, environment);
* ``slmkit.checkpoint.digest`` of it: the sha256 over every tensor byte that
  ``atomic_save`` adds and ``load`` verifies;
* ``torch.save`` into memory (serialisation alone, no disk);
* ``slmkit.checkpoint.atomic_save`` to a new file (checksum, ``torch.save``, ``fsync``,
  rename, ``fsync`` of the folder);
* ``Trainer.save_checkpoint`` (payload + atomic_save + the ``latest.pt`` hard link +
  pruning + the log event), what a run does every ``checkpoint_every`` steps;
* ``slmkit.checkpoint.load`` of the file (``torch.load(weights_only=True)`` + checksum
  verification) and ``torch.load`` alone (alternating which goes first), and the digest
  of the loaded payload: the verification part of ``load``.

The file was just written, so loads read it from the page cache: they measure
deserialisation and verification, not the disk.

    uv run python -m bench checkpoint [--quick | --smoke] [--repeats R] [--dir DIR]
                                      [--device D] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench import fmt_spread, machine_line, parse_args, spread, table
from bench.training import (
    EXPERIMENT,
    Contender,
    add_common_options,
    build_trainer,
    experiment_overrides,
    result_name,
    save_results,
    shown,
)


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Wall seconds of ``fn(*args, **kwargs)`` and what it returned."""
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - started, out


def tensor_bytes(value: Any) -> int:
    """Bytes of tensor data in a nested structure."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write ``<out>/checkpoint[-quick|-smoke].json``."""
    from slmkit import checkpoint

    parser = argparse.ArgumentParser(prog="bench.checkpoint", description=__doc__.split("\n")[0])
    add_common_options(parser)
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (quick 3, smoke 1)")
    parser.add_argument(
        "--dir", default=None, help="where the files are written (default: a temporary folder)"
    )
    args = parse_args(parser, argv)
    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 7)
    overrides = experiment_overrides(args)

    print(machine_line())
    times: dict[str, list[float]] = {
        k: []
        for k in (
            "payload",
            "digest",
            "serialise",
            "atomic_save",
            "save_checkpoint",
            "load",
            "torch_load",
            "verify",
        )
    }
    with tempfile.TemporaryDirectory(prefix="slmkit-bench-ckpt-", dir=args.dir) as tmp:
        folder = Path(tmp)
        contender = Contender("fp32", build_trainer(overrides, folder / "runs"))
        trainer, run = contender.trainer, contender.run
        contender.steps(1)
        settings = " ".join(f"--set {o}" for o in overrides)
        print(f"{EXPERIMENT} {settings}; device {trainer.device}; files in {folder}")
        print(
            f"model: {trainer.model.n_params:,} parameters, after {trainer.state.step} step(s) "
            f"(AdamW state present); {repeats} repeat(s)"
        )
        for i in range(repeats):
            seconds, payload = timed(trainer.state.payload, run.run_id)
            times["payload"].append(seconds)
            times["digest"].append(timed(checkpoint.digest, payload)[0])
            times["serialise"].append(timed(torch.save, payload, io.BytesIO())[0])
            path = folder / f"step_{i}.pt"
            times["atomic_save"].append(timed(checkpoint.atomic_save, payload, path)[0])
            times["save_checkpoint"].append(timed(trainer.save_checkpoint, run)[0])
            for which in ("load", "torch_load") if i % 2 == 0 else ("torch_load", "load"):
                if which == "load":
                    seconds, loaded = timed(checkpoint.load, path)
                else:
                    seconds, _ = timed(torch.load, path, map_location="cpu", weights_only=True)
                times[which].append(seconds)
            times["verify"].append(timed(checkpoint.digest, loaded)[0])
            if i < repeats - 1:
                path.unlink()
        size = path.stat().st_size
        parts = {
            "model": tensor_bytes(payload["model"]),
            "optimizer": tensor_bytes(payload["optimizer"]),
            "rng": tensor_bytes(payload["rng"]),
        }
        verified = loaded.get("checksum") == checkpoint.digest(payload)
        contender.close()

    ms = {k: spread([1e3 * s for s in v]) for k, v in times.items()}
    mb = size / 1e6
    labels = {
        "payload": "TrainState.payload",
        "digest": "checkpoint.digest (sha256 of the contents)",
        "serialise": "torch.save into memory",
        "atomic_save": "checkpoint.atomic_save (digest + torch.save + fsync + rename)",
        "save_checkpoint": "Trainer.save_checkpoint (payload + atomic_save + latest.pt + prune)",
        "load": "checkpoint.load (torch.load weights_only + checksum verification)",
        "torch_load": "torch.load alone (weights_only, page cache)",
        "verify": "checkpoint.digest of the loaded payload (what load verifies)",
    }
    rows = [
        [
            labels[k],
            fmt_spread(v, "{:.1f}"),
            "-" if k == "payload" else fmt_spread(spread([mb / s for s in times[k]]), "{:.0f}"),
        ]
        for k, v in ms.items()
    ]
    print()
    print(table(["operation", "ms", "MB/s of the file"], rows))
    print(f"(median (min–max) over {repeats} repeat(s))")
    print(
        f"file size: {size:,} bytes ({mb:.1f} MB): model tensors {parts['model'] / 1e6:.1f} MB, "
        f"optimizer state {parts['optimizer'] / 1e6:.1f} MB, RNG states "
        f"{parts['rng'] / 1e6:.2f} MB; the loaded checksum matches: {'yes' if verified else 'NO'}"
    )
    save_share = 100 * ms["digest"]["median"] / ms["atomic_save"]["median"]
    load_share = 100 * ms["verify"]["median"] / ms["load"]["median"]
    print(
        f"checksum share (medians): digest {save_share:.0f} % of atomic_save, "
        f"verification {load_share:.0f} % of load"
    )
    if args.smoke:
        print("(smoke run: tiny model, figures not meaningful)")

    result = {
        "experiment": EXPERIMENT,
        "config": {
            "overrides": overrides,
            "device": str(trainer.device),
            "n_params": trainer.model.n_params,
            "step": trainer.state.step,
            "repeats": repeats,
            "dir": args.dir or tempfile.gettempdir(),
            "quick": args.quick,
            "smoke": args.smoke,
        },
        "ms": ms,
        "ms_all": {k: [1e3 * s for s in v] for k, v in times.items()},
        "file_bytes": size,
        "tensor_bytes": parts,
        "checksum_verified": verified,
        "save_mb_per_s": spread([mb / s for s in times["atomic_save"]]),
        "load_mb_per_s": spread([mb / s for s in times["load"]]),
    }
    out = save_results(result_name("checkpoint", args), result, args.out)
    print(f"wrote {shown(out)}")
    return result


if __name__ == "__main__":
    main()
