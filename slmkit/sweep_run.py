"""``slmkit run X.toml --sweep ... --seeds N [--jobs K] [--resume-sweep ID]``: a sweep run.

Every member is resolved first (:func:`slmkit.sweep_plan.plan_sweep`), so a bad value stops
the sweep before any run. Members then run one after another in this process (``--jobs 1``)
or as up to K child processes at once (:mod:`slmkit.sweep_jobs`). A member that fails is
reported and the others go on; the command then exits 1. Ctrl-C stops the whole sweep (the
running members save a checkpoint) and prints the command that resumes it. At the end the
sweep's table is printed, one row per member. All of it goes through one :class:`Console`,
which goes quiet if the reader leaves (``| head``) rather than stopping the sweep.
"""

from __future__ import annotations

import argparse
import sys

from slmkit.config.schema import Experiment
from slmkit.errors import RunError, RunInterrupted, SlmkitError
from slmkit.plugins import PluginManager
from slmkit.progress import Console, format_duration
from slmkit.runs import RunRecord, list_runs
from slmkit.runs_table import runs_table
from slmkit.sweep_board import MemberProgress, SweepBoard, SweepProgress, member_names
from slmkit.sweep_jobs import run_jobs
from slmkit.sweep_plan import Member, Sweep, plan_sweep, resume_sweep_command


def run_sweep(args: argparse.Namespace, manager: PluginManager, base: Experiment) -> int:
    """Run the sweep ``args`` asks for (``base``: the experiment with its ``--set`` values)."""
    sweep = plan_sweep(args, manager, base)
    console = Console()
    shown = [
        MemberProgress(m.index, len(sweep.members), m.combo, m.exp.training.max_steps,
                       state="done" if m.done else "waiting")
        for m in sweep.members
    ]  # fmt: skip
    progress = SweepProgress(shown)
    to_run = [(m, s) for m, s in zip(sweep.members, shown, strict=True) if not m.done]
    done = len(sweep.members) - len(to_run)
    header = f"sweep {sweep.sweep_id}: {len(sweep.members)} runs of {sweep.source}"
    if done:
        header += f", {done} finished already"
    if args.jobs > 1 and to_run:
        header += f", up to {min(args.jobs, len(to_run))} at once"
    console.say(header)
    resume = resume_sweep_command(args, sweep.sweep_id)
    if args.jobs > 1:
        board = SweepBoard(console, sweep.sweep_id, progress)
        failed = run_jobs(sweep, to_run, args.jobs, board, init_from=args.init_from,
                          debug=args.debug, resume_command=resume)  # fmt: skip
    else:
        failed = _run_here(sweep, to_run, args, manager, console, progress, resume)
    _summary(sweep, console)
    if failed:
        raise RunError(f"sweep {sweep.sweep_id}: run(s) {member_names(failed)} failed")
    return 0


def _run_here(
    sweep: Sweep,
    to_run: list[tuple[Member, MemberProgress]],
    args: argparse.Namespace,
    manager: PluginManager,
    console: Console,
    progress: SweepProgress,
    resume: str,
) -> list[MemberProgress]:
    """The members one after another in this process; the ones that failed."""
    from slmkit.train import Trainer

    failed = []
    for member, shown in to_run:
        line = f"sweep {sweep.sweep_id}: {shown.name}: {' '.join(shown.overrides)}"
        eta = progress.eta_s()
        if eta is not None:
            line += f" ({progress.count('finished', 'done')} finished, ETA {format_duration(eta)})"
        console.say(line)
        shown.state = "running"
        try:
            summary = Trainer(
                member.exp, manager, sweep.source, resume=member.resume,
                init_from=None if member.resume else args.init_from, runs_dir=sweep.runs_dir,
                console=console, sweep=sweep.tag(member), overrides=member.overrides,
            ).run()  # fmt: skip
        except RunInterrupted as exc:
            raise RunInterrupted(f"{exc}; or the whole sweep: {resume}", exc.exit_code) from None
        except SlmkitError as exc:  # bad input of this member alone, or its run failed
            shown.state = "failed"
            failed.append(shown)
            print(f"sweep {sweep.sweep_id}: {shown.name} failed: {exc}", file=sys.stderr)
            continue
        shown.state, shown.step = "finished", int(summary["steps"])
    return failed


def members_of(records: list[RunRecord]) -> list[RunRecord]:
    """One run per member, in grid order: its finished run, else its newest."""
    chosen: dict[int, RunRecord] = {}
    for record in records:  # newest first
        index = (record.sweep or {}).get("index")
        if not isinstance(index, int):
            continue
        if index not in chosen or (
            record.status == "finished" and chosen[index].status != "finished"
        ):
            chosen[index] = record
    return [chosen[index] for index in sorted(chosen)]


def _summary(sweep: Sweep, console: Console) -> None:
    """The sweep's table, one row per member, and the command that compares them."""
    found = list_runs(sweep.runs_dir, sweep=sweep.sweep_id) if sweep.runs_dir.is_dir() else []
    records = members_of(found)
    console.say(f"\nsweep {sweep.sweep_id}: {len(records)} runs in {sweep.runs_dir}")
    if records:
        console.say(runs_table(records, sweep.keys).rstrip("\n"))
    console.say(
        f"compare: slmkit compare --sweep {sweep.sweep_id} --runs-dir {sweep.runs_dir} "
        "--out report.html"
    )
