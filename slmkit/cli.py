"""The ``slmkit`` command line: run, validate, plugins, sample, eval."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence

from slmkit import __version__
from slmkit.errors import RunInterrupted, SlmkitError
from slmkit.plugins import PluginManager


def _manager() -> PluginManager:
    return PluginManager().load()


# -- commands ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Train an experiment (or resume a run)."""
    from slmkit.experiment import load_experiment
    from slmkit.train import Trainer

    manager = _manager()
    exp = load_experiment(args.experiment, manager, args.set)
    trainer = Trainer(exp, manager, args.experiment, resume=args.resume, runs_dir=args.runs_dir)
    trainer.run()
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Resolve an experiment and its plugins; print it and the parameter count."""
    import torch

    from slmkit.build import build_model, build_tokenizer
    from slmkit.experiment import load_experiment

    manager = _manager()
    exp = load_experiment(args.experiment, manager, args.set)
    tokenizer = build_tokenizer(exp, manager)
    with torch.device("meta"):  # sizes only: no memory, no initialisation cost
        model = build_model(exp, manager, tokenizer)
    print(f"# {args.experiment}: valid")
    print(f"# config_hash {exp.config_hash}")
    print(f"# plugins: {', '.join(exp.participants)}")
    print(exp.to_toml(), end="")
    print(f"# parameters: {model.n_params:,} ({model.n_params})")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """List every plugin: name, version, source, components, hooks; broken ones too."""
    manager = _manager()
    infos = manager.all_plugins()
    if args.json:
        print(json.dumps([i.as_json() for i in infos], indent=2))
        return 0
    rows = [("NAME", "VERSION", "SOURCE", "PROVIDES", "HOOKS")]
    for info in infos:
        provides = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info.provides.items())
        rows.append(
            (
                info.name,
                info.version or "-",
                "builtin" if info.builtin else info.source,
                f"BROKEN: {info.error}" if info.broken else provides or "-",
                ", ".join(info.hooks) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[4]
        )
    for group in manager.registry.conflicts():
        who = ", ".join(c.plugin for c in group)
        print(f"warning: {group[0].kind} {group[0].name!r} is registered by {who}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Generate text from a saved model."""
    from slmkit.build import load_trained
    from slmkit.train import sample_text

    trained = load_trained(args.run, _manager(), args.device)
    text = sample_text(
        trained.model,
        trained.tokenizer,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        device=trained.device,
        use_cache=not args.no_cache,
    )
    sys.stdout.write(args.prompt + text + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Recompute the validation loss of a saved model."""
    from slmkit.build import load_trained, read_experiment_corpus
    from slmkit.data import prepare_splits, validation_batches
    from slmkit.errors import ConfigError, DataError
    from slmkit.train import bits_per_char, evaluate

    manager = _manager()
    trained = load_trained(args.run, manager, args.device)
    exp, tokenizer = trained.experiment, trained.tokenizer
    source = f"{args.run} (experiment)"
    text = read_experiment_corpus(exp, manager)
    try:
        splits = prepare_splits(
            text, tokenizer, exp.data.val_fraction, exp.model.context_length, train_tokenizer=False
        )
    except DataError as exc:
        raise ConfigError(source, "data", str(exc)) from None
    batch_size = exp.training.batch_size * trained.world_size  # the run's global batch
    batches = validation_batches(
        splits.val, exp.model.context_length, batch_size, exp.training.eval_batches
    )
    val_loss = evaluate(trained.model, batches, trained.device)
    result = {
        "step": trained.step,
        "val_loss": val_loss,
        "val_bpc": bits_per_char(val_loss, splits.chars_per_token),
        "val_tokens": sum(y.numel() for _, y in batches),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"step {result['step']}: val_loss {val_loss:.4f} nats/token, "
            f"{result['val_bpc']:.4f} bits/char over {result['val_tokens']:,} tokens"
        )
    return 0


# -- parser --------------------------------------------------------------------------------


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
        help="continue a run from a checkpoint (a run folder means its latest.pt)",
    )
    p.add_argument("--runs-dir", help="where run folders go (default: experiment.runs_dir)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check an experiment and print it resolved; train nothing")
    p.add_argument("experiment", help="experiment TOML file")
    overrides(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plugins", help="list installed plugins and what they provide")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("sample", help="generate text from a saved model")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="only the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--no-cache", action="store_true", help="recompute the context each token")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="validation loss of a saved model")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if getattr(args, "max_new_tokens", 1) <= 0:
        raise SlmkitError("--max-new-tokens: must be > 0")
    if getattr(args, "temperature", 1.0) <= 0:
        raise SlmkitError("--temperature: must be > 0")
    if getattr(args, "top_k", 0) < 0:
        raise SlmkitError("--top-k: must be >= 0")
    if not 0 < getattr(args, "top_p", 1.0) <= 1:
        raise SlmkitError("--top-p: must be in (0, 1]")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slmkit`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        return int(args.func(args))
    except RunInterrupted as exc:
        print(f"slmkit: stopped by {exc}", file=sys.stderr)
        return exc.exit_code
    except SlmkitError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"slmkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("slmkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"slmkit: internal error: {type(exc).__name__}: {exc} "
            "(run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
