"""A sweep's plan: every member's experiment, resolved before any of them runs.

The grid is the ``--sweep`` axes, then the seeds (``--seeds N`` or ``[experiment] seeds``)
as the last axis (:mod:`slmkit.sweep`). Each member is the experiment with the command's
``--set`` values, then its own ``KEY=VALUE`` values of the grid; when the experiment lists
``seeds``, they are cleared in the member (``experiment.seeds=[]``), which is one run of
one seed, so its run folder's ``experiment.toml`` runs and resumes as a single run and the
members of a seed axis differ in ``experiment.seed`` only.

``--resume-sweep ID`` plans the same grid under the sweep id ``ID``: the runs of that sweep
in the runs folder must have been made by the same grid (size and values) and experiment;
a member with a run finished at its ``training.max_steps`` is done, one with an unfinished
run that saved a checkpoint (or a finished one, when ``max_steps`` was raised) continues
it, any other starts again.
"""

from __future__ import annotations

import argparse
import shlex
import tomllib
from pathlib import Path
from typing import Any

import attrs

from slmkit.config.diff import changed_keys, not_hashed
from slmkit.config.resolve import load_experiment
from slmkit.config.schema import Experiment
from slmkit.distributed import World
from slmkit.errors import SlmkitError
from slmkit.plugins import PluginManager
from slmkit.rundir import runs_folder
from slmkit.runs import RunRecord, list_runs
from slmkit.signals import launcher
from slmkit.sweep import (
    SEEDS_KEY,
    axis_keys,
    grid,
    new_sweep_id,
    parse_sweeps,
    seed_axis,
    seed_values,
)


@attrs.define
class Member:
    """One run of a sweep: its place in the grid, its experiment, how it starts."""

    index: int
    #: its ``KEY=VALUE`` values in the grid (the sweep tag's ``overrides``)
    combo: list[str]
    exp: Experiment
    #: every override behind ``exp``: the command's ``--set``, the combo, seeds cleared
    overrides: list[str]
    #: an unfinished run folder of this member to continue (``--resume-sweep``)
    resume: Path | None = None
    #: it has a finished run already (``--resume-sweep``): not run again
    done: bool = False


@attrs.define
class Sweep:
    """The sweep to run: its id, its members, where their run folders go."""

    sweep_id: str
    source: str
    #: the swept keys, one per axis (the table's extra columns)
    keys: list[str]
    members: list[Member]
    runs_dir: Path

    def tag(self, member: Member) -> dict[str, Any]:
        """The ``sweep`` field of the member's ``run_start``."""
        return {"id": self.sweep_id, "index": member.index, "size": len(self.members),
                "overrides": member.combo}  # fmt: skip


def wants_sweep(args: argparse.Namespace, base: Experiment) -> bool:
    """Whether ``slmkit run`` runs a sweep: asked by an option, or the experiment's seeds."""
    return bool(
        args.sweep
        or args.seeds is not None
        or base.experiment.seeds
        or args.resume_sweep
        or args.jobs != 1
    )


def plan_sweep(args: argparse.Namespace, manager: PluginManager, base: Experiment) -> Sweep:
    """Check the options, resolve every member (a bad value stops the sweep before any
    run), and for ``--resume-sweep`` match the runs already made."""
    if args.sweep_member:
        raise SlmkitError(
            "--sweep-member: one run of a sweep, given by the sweep that starts it; it cannot "
            "be combined with --sweep, --seeds, --jobs, --resume-sweep or experiment.seeds"
        )
    if args.resume:
        raise SlmkitError(
            "--sweep starts new runs (so do --seeds and experiment.seeds); it cannot be combined "
            "with --resume: continue a sweep with --resume-sweep ID"
        )
    if World.from_env().launched:  # one process group per process: one run per torchrun
        raise SlmkitError(
            "--sweep cannot run under torchrun (nor --seeds); start one torchrun per "
            "combination with --set"
        )
    seeds = seed_values(args.seeds, base.experiment.seeds, base.experiment.seed, args.experiment)
    axes = seed_axis(parse_sweeps(args.sweep), seeds)
    if not axes:
        option = f"--resume-sweep {args.resume_sweep}" if args.resume_sweep else "--jobs"
        raise SlmkitError(
            f"{option}: nothing to sweep; give --sweep KEY=V1,V2,... or --seeds N "
            "(or [experiment] seeds)"
        )
    clear = [f"{SEEDS_KEY}=[]"] if base.experiment.seeds else []
    members = []
    for index, combo in enumerate(grid(axes)):
        overrides = [*args.set, *combo, *clear]
        exp = load_experiment(args.experiment, manager, overrides)
        members.append(Member(index, combo, exp, overrides))
    runs_dir = runs_folder(args.runs_dir, members[0].exp.experiment.runs_dir)
    keys = axis_keys(axes)
    if not args.resume_sweep:
        sweep_id = new_sweep_id(members[0].exp.experiment.name)
        return Sweep(sweep_id, args.experiment, keys, members, runs_dir)
    sweep = Sweep(args.resume_sweep, args.experiment, keys, members, runs_dir)
    match_previous(sweep)
    return sweep


def match_previous(sweep: Sweep) -> None:
    """Mark the members the sweep's runs already made: done, or to continue.

    Refuses (changing nothing) a grid or experiment other than those runs', and a run that
    is still going.
    """
    option, size = f"--resume-sweep {sweep.sweep_id}", len(sweep.members)
    records = list_runs(sweep.runs_dir, sweep=sweep.sweep_id) if sweep.runs_dir.is_dir() else []
    if not records:
        raise SlmkitError(f"{option}: no runs of that sweep in {sweep.runs_dir}")
    found: dict[int, list[RunRecord]] = {}
    # in grid order (the first mismatch is the one named), the newest first within a member
    records.sort(key=lambda r: (r.sweep or {}).get("index", -1))
    for record in records:
        tag = record.sweep or {}
        index, overrides = tag.get("index"), tag.get("overrides")
        if tag.get("size") != size:
            raise SlmkitError(
                f"{option}: that sweep has {tag.get('size')} runs, these options make {size}; "
                "give the --sweep, --seeds and --set options it was started with"
            )
        if not isinstance(index, int) or not 0 <= index < size:
            raise SlmkitError(f"{option}: {record.run_dir} has no valid sweep index ({index!r})")
        combo = sweep.members[index].combo
        if overrides != combo:
            raise SlmkitError(
                f"{option}: its run {index + 1} is {_shown(overrides)}, these options make it "
                f"{_shown(combo)}; give the options the sweep was started with"
            )
        _check_experiment(option, sweep.members[index], record)
        found.setdefault(index, []).append(record)
    for index, runs in found.items():
        member = sweep.members[index]
        running = [r for r in runs if r.status == "running"]
        if running:
            raise SlmkitError(
                f"{option}: run {index + 1} is still running ({running[0].status_detail}) in "
                f"{running[0].run_dir}; stop it first"
            )
        # a run finished short of a raised max_steps trains on, as --resume would
        target = member.exp.training.max_steps
        member.done = any(r.status == "finished" and r.steps >= target for r in runs)
        saved = [r.run_dir for r in runs if any((r.run_dir / "checkpoints").glob("*.pt"))]
        if not member.done and saved:
            member.resume = saved[0]  # the newest run that saved a checkpoint


def _check_experiment(option: str, member: Member, record: RunRecord) -> None:
    """Refuse a member whose experiment is not the one its run folder holds."""
    if record.status == "damaged" or record.config_hash == member.exp.config_hash:
        return  # a damaged folder's resume fails on its own, as that member's failure
    written = tomllib.loads(member.exp.to_toml())  # the shape experiment.toml has
    keys = [k for k in changed_keys(record.experiment, written) if not not_hashed(k)]
    raise SlmkitError(
        f"{option}: run {member.index + 1}'s experiment differs from "
        f"{record.run_dir / 'experiment.toml'} in {', '.join(keys) or 'its config_hash'}; "
        "give the experiment and --set options the sweep was started with"
    )


def _shown(overrides: Any) -> str:
    return " ".join(map(str, overrides)) if isinstance(overrides, list) else repr(overrides)


def resume_sweep_command(args: argparse.Namespace, sweep_id: str) -> str:
    """The command that continues this sweep: its options, and ``--resume-sweep ID``."""
    options = [
        *(a for value in args.set for a in ("--set", value)),
        *(a for value in args.sweep for a in ("--sweep", value)),
        *(["--seeds", str(args.seeds)] if args.seeds is not None else []),
        *(["--runs-dir", args.runs_dir] if args.runs_dir is not None else []),
        *(["--init-from", args.init_from] if args.init_from else []),
        *(["--jobs", str(args.jobs)] if args.jobs != 1 else []),
    ]
    tail = shlex.join(["run", args.experiment, *options, "--resume-sweep", sweep_id])
    return f"{launcher()} {tail}"
