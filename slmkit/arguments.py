"""The ``slmkit`` command line's grammar: every command's arguments, and the checks of
their values that argparse cannot make (ranges, and ``--opt=--``).

:mod:`slmkit.cli` runs the command that :func:`parse_args` names (``args.command``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from slmkit import __version__
from slmkit.errors import SlmkitError


def finite_float(text: str) -> float:
    """An argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="slmkit", description="Build and study small language models from plugins."
    )
    parser.add_argument("--version", action="version", version=f"slmkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a dotted experiment key, TOML syntax (repeatable)",
        )

    p = sub.add_parser("run", help="train an experiment")
    p.add_argument("experiment", help="experiment TOML file")
    overrides(p)
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT_OR_RUN_DIR",
        help="continue a run in its folder, from its newest good checkpoint (or from this "
        "checkpoint file in its checkpoints/)",
    )
    p.add_argument(
        "--init-from",
        metavar="CHECKPOINT_OR_RUN_DIR",
        help="start a new run from the weights (and tokenizer) of a checkpoint; a run folder "
        "means its newest good one. Optimizer, schedule and step start fresh",
    )
    p.add_argument("--runs-dir", help="where run folders go (default: experiment.runs_dir)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch's CPU threads: --set training.threads=N (default: torch's own count; "
        "1 is often much faster when other work shares the cores)",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="run once per value (repeat for a grid of every combination); KEY1,KEY2=[A1,A2],"
        "[B1,B2] sets keys together; see docs/comparing-runs.md",
    )
    p.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="N runs that differ only in experiment.seed: seed, seed+1, ..., seed+N-1 (the "
        "sweep's last axis; [experiment] seeds lists them instead)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="K",
        help="run up to K runs of a sweep at once, as separate processes sharing the CPU "
        "threads (one CUDA device each where several exist); default 1: one after another here",
    )
    p.add_argument(
        "--resume-sweep",
        metavar="ID",
        help="continue sweep ID (with the options it was started with): finished runs are "
        "skipped, unfinished ones continue from their checkpoint",
    )
    # a run started by a sweep with --jobs: its sweep tag, as JSON (slmkit.sweep_jobs)
    p.add_argument("--sweep-member", metavar="JSON", help=argparse.SUPPRESS)

    p = sub.add_parser("validate", help="check an experiment and print it resolved; train nothing")
    p.add_argument("experiment", help="experiment TOML file")
    overrides(p)

    p = sub.add_parser("plugins", help="list installed plugins and what they provide")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("sample", help="generate text from a saved model")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=finite_float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="only the k most likely tokens (0: all)")
    p.add_argument(
        "--top-p", type=finite_float, default=1.0, help="nucleus sampling threshold (1: off)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling (0 <= seed < 2**63)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--no-cache", action="store_true", help="recompute the context each token")

    p = sub.add_parser("eval", help="validation loss of a saved model")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("runs", help="list runs, newest first")
    p.add_argument("dir", nargs="?", default="runs", help="a folder of runs (default: runs)")
    p.add_argument("--sweep", metavar="ID", help="only the runs of this sweep")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--watch",
        action="store_true",
        help="redraw the table in place while runs train, with each running run's ETA and a "
        "sparkline of its validation losses; Ctrl-C quits (not a terminal: printed once)",
    )
    p.add_argument("--interval", type=finite_float, metavar="SECONDS",
                   help="seconds between two redraws of --watch (default 2)")  # fmt: skip

    p = sub.add_parser("compare", help="runs side by side: config diff, metrics, loss curves")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders or run ids")
    p.add_argument(
        "--sweep", metavar="ID", action="append", default=[],
        help="add every run of this sweep (repeatable)",
    )  # fmt: skip
    p.add_argument("--runs-dir", default="runs", help="where run ids are looked up (default: runs)")
    p.add_argument("--out", metavar="REPORT.html", help="write a self-contained HTML report")
    p.add_argument("--png", metavar="FILE.png", help="write the loss curves as a PNG")
    p.add_argument("--probes-png", metavar="FILE.png",
                   help="write the probe metrics (curves, heads) as a PNG")  # fmt: skip
    p.add_argument(
        "--baseline", action="append", default=[], metavar="KEY=VALUE",
        help="the group of seeds the others are tested against (default: the first group)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("scaling", help="fit a scaling law to runs' final validation losses")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders or run ids")
    p.add_argument("--sweep", metavar="ID", help="add every run of this sweep")
    p.add_argument("--runs-dir", default="runs", help="where run ids are looked up (default: runs)")
    p.add_argument(
        "--leave-out",
        metavar="RUN",
        help="keep this run out of the fit and compare its final loss with the prediction",
    )
    p.add_argument(
        "--budget",
        type=finite_float,
        metavar="FLOPS",
        help="the compute C = 6ND of the compute-optimal allocation (default: the largest "
        "fitted run's)",
    )
    p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap (default 0)")
    p.add_argument("--out", metavar="REPORT.html", help="write a self-contained HTML report")
    p.add_argument("--png", metavar="FILE.png", help="write the log-log picture as a PNG")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("export", help="replay runs from their logs into a tracker")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders or run ids")
    p.add_argument("--to", required=True, metavar="TRACKER",
                   help="the tracker: tensorboard, trackio (or a plugin's)")  # fmt: skip
    p.add_argument("--runs-dir", default="runs", help="where run ids are looked up (default: runs)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; usage errors exit 2 with argparse's message.

    CPython's argparse turns ``--opt=--`` into an empty list, past ``type`` and
    ``choices``: such a value is refused here as the missing argument it is.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    command = commands.choices[args.command]
    for action in command._actions:
        value = getattr(args, action.dest, None)
        if action.nargs is not None or not isinstance(value, list):
            continue
        if not isinstance(action, argparse._AppendAction) or any(
            isinstance(v, list) for v in value
        ):
            command.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
    return args


def check_args(args: argparse.Namespace) -> None:
    """Value checks argparse's types do not make; each error names the option."""
    if (getattr(args, "threads", None) or 0) < 0:
        raise SlmkitError("--threads: must be >= 0 (0: torch's own count)")
    if getattr(args, "seeds", None) is not None and args.seeds < 1:
        raise SlmkitError(f"--seeds: must be >= 1, got {args.seeds}")
    if getattr(args, "jobs", 1) < 1:
        raise SlmkitError(f"--jobs: must be >= 1, got {args.jobs}")
    if getattr(args, "max_new_tokens", 1) <= 0:
        raise SlmkitError("--max-new-tokens: must be > 0")
    if getattr(args, "temperature", 1.0) <= 0:
        raise SlmkitError("--temperature: must be > 0")
    if getattr(args, "top_k", 0) < 0:
        raise SlmkitError("--top-k: must be >= 0")
    if not 0 < getattr(args, "top_p", 1.0) <= 1:
        raise SlmkitError("--top-p: must be in (0, 1]")
    if not 0 <= getattr(args, "seed", 0) < 2**63:
        raise SlmkitError("--seed: must be in [0, 2**63)")
    if getattr(args, "budget", None) is not None and args.budget <= 0:
        raise SlmkitError("--budget: must be > 0 FLOPs")
    if getattr(args, "resamples", 10) < 10:
        raise SlmkitError("--resamples: must be >= 10")
    if getattr(args, "watch", False) and args.json:
        raise SlmkitError("--watch: not with --json (a script polls `slmkit runs --json`)")
    if getattr(args, "interval", None) is not None:
        if not args.watch:
            raise SlmkitError("--interval: only with --watch")
        if args.interval <= 0:
            raise SlmkitError(f"--interval: must be > 0 seconds, got {args.interval:g}")
    if getattr(args, "runs_dir", None) == "":  # run: "" would mean the current folder
        raise SlmkitError("--runs-dir: must name a folder")
