"""``slmkit export RUN... --to TRACKER``: runs replayed from their logs into a tracker.

Each run's kept events (``log.jsonl``, without what a resumed run trained again) are fed
to the tracker exactly as a live run feeds its trackers (:meth:`Trackers.replay`), so an
exported run and a streamed one hold the same values. The tracker is built with the
options of the run's own ``[[trackers]]`` table of that name, if it has one (TensorBoard's
folder, trackio's project), else with the tracker's defaults. Trackers record only what
their store lacks, so exporting a run that streamed (or was exported) before adds nothing,
and completes one whose tracker failed or was added later.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slmkit.build import construct
from slmkit.config.resolve import resolve_table
from slmkit.errors import ConfigError, SlmkitError
from slmkit.hooks import EnabledHook
from slmkit.plugins import PluginManager
from slmkit.runs import read_run, resolve_run
from slmkit.trackers import TrackerFailed, Trackers


def export_command(args: argparse.Namespace, manager: PluginManager) -> int:
    """Export every run named (all checked first) to the tracker ``args.to``."""
    if not args.runs:
        raise SlmkitError("export: name at least one run (a run folder or id)")
    runs = [resolve_run(name, args.runs_dir) for name in args.runs]
    trackers = [tracker_for(run_dir, args.to, manager) for run_dir in runs]
    for run_dir, tracker in zip(runs, trackers, strict=True):
        exported = Trackers([tracker])
        try:
            exported.replay(run_dir)
        except TrackerFailed as exc:
            raise SlmkitError(f"{run_dir}: {exc}") from None
        where = "".join(f": {where}" for _, where in exported.where)
        print(f"exported {run_dir} to {args.to}{where}")
    return 0


def tracker_for(run_dir: Path, name: str, manager: PluginManager) -> EnabledHook:
    """The tracker ``name`` for a run: with the options of its ``[[trackers]]`` table of
    that name, if it has one. A running or damaged run is refused with one line."""
    record = read_run(run_dir)
    if record.status in ("running", "damaged"):
        raise SlmkitError(
            f"{run_dir}: {record.status} ({record.status_detail}); export a run that has "
            "stopped, whose files are whole"
        )
    plugins: dict[str, Any] = record.experiment.get("plugins", {})
    participants = manager.participants(plugins.get("enable", []), plugins.get("disable", []))
    tables = record.experiment.get("trackers", [])
    index = next((i for i, t in enumerate(tables) if t.get("name") == name), None)
    if index is None:  # not a tracker of the run: its defaults, the name as --to gave it
        table, source, prefix = {"name": name}, "--to", name
    else:
        table, source, prefix = tables[index], str(run_dir / "experiment.toml"), f"trackers.{index}"
    try:
        section = resolve_table("tracker", table, manager, participants, source, prefix)
    except ConfigError as exc:
        if index is not None:
            raise
        raise SlmkitError(f"--to: {exc.message}") from None
    tracker = construct(source, section, prefix)
    return EnabledHook("tracker", name, section.component.plugin, tracker)
