"""The ``slmkit`` command line: run, validate, plugins, sample, eval, runs, compare, scaling,
export."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from slmkit.arguments import check_args, parse_args
from slmkit.errors import RunInterrupted, SlmkitError
from slmkit.plugins import PluginManager
from slmkit.table import format_table


def _manager() -> PluginManager:
    return PluginManager().load()


# -- commands ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Train an experiment (or resume a run), or every run of a sweep (:mod:`slmkit.sweep_run`)."""
    from slmkit.config.resolve import load_experiment
    from slmkit.distributed import World
    from slmkit.rundir import check_runs_folder
    from slmkit.sweep import member_tag
    from slmkit.sweep_plan import wants_sweep
    from slmkit.train import Trainer

    if args.resume and args.init_from:
        raise SlmkitError(
            "--resume continues a run in its folder, --init-from starts a new one: use one"
        )
    manager = _manager()
    if args.threads is not None:  # short for --set training.threads=N
        args.set = [*args.set, f"training.threads={args.threads}"]
    exp = load_experiment(args.experiment, manager, args.set)
    if not args.resume and World.from_env().is_main:  # refused before anything is built
        check_runs_folder(args.runs_dir, exp.experiment.runs_dir, args.experiment)
    if wants_sweep(args, exp):
        from slmkit.sweep_run import run_sweep

        return run_sweep(args, manager, exp)
    sweep = member_tag(args.sweep_member) if args.sweep_member else None
    trainer = Trainer(
        exp, manager, args.experiment, resume=args.resume, init_from=args.init_from,
        runs_dir=args.runs_dir, overrides=args.set, sweep=sweep,
    )  # fmt: skip
    trainer.run()
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Build everything a run builds before training; print the experiment and its sizes.

    The corpus is read and split, the tokenizer trained, the model built on the meta
    device (sizes, no weights), with the optimizer, schedule and hooks: what a run would
    refuse, this refuses first.
    """
    from slmkit.build import build_parts, resolve_device
    from slmkit.config.resolve import load_experiment
    from slmkit.flops import apply_max_flops
    from slmkit.rundir import check_runs_folder

    manager = _manager()
    exp, budget = apply_max_flops(load_experiment(args.experiment, manager, args.set))
    check_runs_folder(None, exp.experiment.runs_dir, args.experiment)  # first, as run does
    device = resolve_device(exp.training.device, args.experiment)
    parts = build_parts(exp, device, meta=True)
    model, splits = parts.model, parts.data.splits
    print(f"# {args.experiment}: valid")
    print(f"# config_hash {exp.config_hash}")
    print(f"# plugins: {', '.join(exp.participants)}")
    print(exp.to_toml(), end="")
    print(f"# parameters: {model.n_params:,} ({model.n_params})")
    print(f"# non-embedding parameters: {model.n_non_embedding_params:,}")
    print(f"# precision: {parts.precision.label} on {device}")
    if budget is not None:
        print(f"# {budget.describe()}")
    print(
        f"# data: {splits.n_chars:,} characters, {len(splits.train):,} training and "
        f"{len(splits.val):,} validation tokens"
    )
    warning = parts.data.unknown_warning()
    if warning is not None:
        print(f"slmkit: warning: {warning}", file=sys.stderr)
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
    print(format_table(rows, wrap_last=True), end="")
    for group in manager.registry.conflicts():
        who = ", ".join(c.plugin for c in group)
        print(f"warning: {group[0].kind} {group[0].name!r} is registered by {who}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Generate text from a saved model."""
    from slmkit.evaluate import sample_text
    from slmkit.trained import load_trained

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
    from slmkit.build import build_data
    from slmkit.errors import RunError
    from slmkit.evaluate import bits_per_char, evaluate
    from slmkit.precision import Precision
    from slmkit.trained import load_trained

    trained = load_trained(args.run, _manager(), args.device)
    # in the precision it trained in, as its logged validation losses were computed
    precision = Precision.of(trained.experiment, trained.device, started=trained.precision)
    # the run's validation set: eval_batches global batches of the ranks that trained it
    data = build_data(
        trained.experiment, trained.tokenizer, train_tokenizer=False, world_size=trained.world_size
    )
    batches, splits = data.val_batches, data.splits
    with precision.autocast():
        val_loss = evaluate(trained.model, batches, trained.device)
    if not math.isfinite(val_loss):
        raise RunError(f"{trained.path}: the validation loss is not finite ({val_loss})")
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


def cmd_runs(args: argparse.Namespace) -> int:
    """List run folders, newest first: status, steps, losses, speed, provenance; with
    ``--watch``, redraw them in place on a terminal (:mod:`slmkit.runs_watch`)."""
    from slmkit.runs import list_runs
    from slmkit.runs_table import runs_table

    records = list_runs(args.dir, sweep=args.sweep)  # its refusals come first, watched or not
    if args.watch and sys.stdout.isatty():
        from slmkit.runs_watch import watch_runs

        return watch_runs(args.dir, args.sweep, args.interval)
    if args.watch:  # a file or a pipe: the table once, as without --watch
        print("slmkit: --watch needs a terminal: the table is printed once", file=sys.stderr)
    if args.json:
        print(json.dumps([r.as_json() for r in records], indent=2))
    elif not records:
        print(f"no runs in {args.dir}" + (f" of sweep {args.sweep}" if args.sweep else ""))
    else:
        swept = []
        if args.sweep:  # the swept keys as extra columns
            swept = [o.partition("=")[0] for o in (records[0].sweep or {}).get("overrides", [])]
        print(runs_table(records, swept), end="")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Diff the runs' experiments, show their metrics; write the curves and a report."""
    from pathlib import Path

    from slmkit.compare import comparison_text, summary_for_json
    from slmkit.compare_report import write_outputs
    from slmkit.runs import gather_runs
    from slmkit.seed_stats import analyse

    nothing = "compare: name at least one run (a run folder or id), or --sweep ID"
    records = gather_runs(args.runs, args.sweep, args.runs_dir, nothing)
    analysis = analyse(records, args.baseline)  # refusals come before anything is written
    written = write_outputs(
        records,
        analysis,
        report=Path(args.out) if args.out else None,
        png=Path(args.png) if args.png else None,
        probes_png=Path(args.probes_png) if args.probes_png else None,
    )
    if args.json:
        print(json.dumps(summary_for_json(records, analysis), indent=2))
    else:
        print(comparison_text(records, analysis), end="")
    for path in written:
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    """Fit a scaling law to runs' final validation losses; print, draw and report it."""
    from slmkit.scaling_report import scaling_command

    return scaling_command(args)


def cmd_export(args: argparse.Namespace) -> int:
    """Replay finished runs from their logs into a tracker (:mod:`slmkit.export`)."""
    from slmkit.export import export_command

    return export_command(args, _manager())


#: each command's function, by the name the command line uses
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "validate": cmd_validate,
    "plugins": cmd_plugins,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "runs": cmd_runs,
    "compare": cmd_compare,
    "scaling": cmd_scaling,
    "export": cmd_export,
}


# -- exits ---------------------------------------------------------------------------------


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (torch raises RuntimeErrors for it)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "allocate" in text)


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``): a name typed with a newline
    in it must not break an error into two lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _allocation_failure(exc: BaseException) -> str:
    """The gist of a failed allocation: torch's message without its source location."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*(err == 0\.\s*)?", "", text)  # "[enforce fail at ...]"
    return f"{text[:160]} (a smaller model, batch or --max-new-tokens may fit)"


def _stdout_gone() -> None:
    """After a BrokenPipeError (``slmkit runs | head -1``): send what remains to devnull.

    Python's docs recommend this, so the interpreter's last flush of stdout cannot fail
    again at exit with a second traceback.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests): nothing to do
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slmkit`` command; returns the exit code."""
    code = _command(argv)
    distributed = sys.modules.get("slmkit.distributed")  # imported only by runs that train
    if distributed is not None:
        distributed.end_rank_process(code)  # a torchrun rank exits here (see why there)
    return code


def _command(argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run the command, turn its failures into a message and exit code."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A path or prompt typed in bytes that are not UTF-8 reaches Python as surrogates;
        # echoing it back writes the bytes the user typed instead of failing.
        sys.stdout.reconfigure(errors="surrogateescape")
    args = parse_args(argv)
    try:
        check_args(args)
        code = int(COMMANDS[args.command](args))
        sys.stdout.flush()  # a reader that went away shows up here, not at exit
        return code
    except BrokenPipeError:  # the reader closed the pipe early: its choice, not an error
        _stdout_gone()
        return 0
    except RunInterrupted as exc:
        print(f"slmkit: stopped by {exc}", file=sys.stderr)
        return exc.exit_code
    except SlmkitError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"slmkit: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("slmkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if _out_of_memory(exc):
            print(f"slmkit: error: out of memory: {_allocation_failure(exc)}", file=sys.stderr)
            return 1
        print(
            f"slmkit: internal error: {type(exc).__name__}: {exc} "
            "(run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
