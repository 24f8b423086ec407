"""Runs grouped by experiment: the runs of a group differ only in their seed.

``slmkit compare`` puts runs whose resolved experiments are the same apart from
:data:`LABEL_KEYS` into one group, labels each group by the keys in which the groups
differ, and checks that every run was measured on the same validation set before
:mod:`slmkit.seed_stats` compares the groups. Nothing here needs scipy or torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import attrs

from slmkit.config.diff import changed_keys, flatten, named_in
from slmkit.config.reading import parse_override
from slmkit.errors import ConfigError, SlmkitError
from slmkit.runs import MISSING, RunRecord, lookup
from slmkit.runs_table import format_value

#: keys (and tables) that do not make runs different experiments: the seed (what a group
#: varies), what only names a run or where it went, the CPU threads (which change only the
#: last digits; see reliability.md) and the trackers (they only watch); config_hash leaves
#: the last two out too
LABEL_KEYS = ("experiment.seed", "experiment.name", "experiment.runs_dir", "training.threads",
              "trackers")  # fmt: skip

#: the label of the one group when all the runs differ only in their seeds
ALL_RUNS = "all runs"

#: keys that decide which text the validation loss is measured on, besides the whole
#: ``[data]`` (corpus, its options, the split) and ``[tokenizer]`` tables
VALIDATION_WINDOW_KEYS = ("model.context_length", "training.batch_size", "training.eval_batches")

#: ``[data]`` keys that decide nothing about the data (a check before the run)
NOT_DATA_KEYS = ("data.require_floor",)


@attrs.define
class Group:
    """Runs of one experiment but for the seed, in the order they were given."""

    #: the group's value of each key the groups differ in
    values: dict[str, Any]
    runs: list[RunRecord]

    @property
    def label(self) -> str:
        """``optimizer.learning_rate=0.001, model.n_layers=2``; :data:`ALL_RUNS` alone."""
        pairs = [f"{key}={format_value(value)}" for key, value in self.values.items()]
        return ", ".join(pairs) or ALL_RUNS


def left_out(records: Sequence[RunRecord]) -> tuple[list[RunRecord], list[tuple[str, str]]]:
    """The finished runs with a final validation loss, and ``(run_id, why)`` for the rest.

    A run still training, stopped, failed or damaged would pull a mean towards a loss
    it never reached (or was never meant to report), so it takes no part in statistics.
    """
    kept, out = [], []
    for record in records:
        if record.status != "finished":
            out.append((record.run_id, record.status))
        elif record.last_val_loss is None or not math.isfinite(record.last_val_loss):
            out.append((record.run_id, "no finite validation loss"))
        else:
            kept.append(record)
    return kept, out


def _defining(record: RunRecord) -> str:
    """The run's experiment without :data:`LABEL_KEYS`, as one comparable string."""
    flat = {k: v for k, v in flatten(record.experiment).items() if not named_in(k, LABEL_KEYS)}
    return json.dumps(flat, sort_keys=True, default=str)


def group_runs(records: Sequence[RunRecord]) -> list[Group]:
    """Runs whose experiments differ only in :data:`LABEL_KEYS`, grouped in first-seen order.

    Each group's ``values`` are the keys in which any two groups differ, less the keys
    some group lacks (the options of another component: ``optimizer.momentum`` of muon
    beside adamw's ``optimizer.betas``) while the labels stay apart without them.
    """
    by_experiment: dict[str, list[RunRecord]] = {}
    for record in records:
        by_experiment.setdefault(_defining(record), []).append(record)
    members = list(by_experiment.values())
    keys: set[str] = set()
    for other in members[1:]:
        keys.update(changed_keys(members[0][0].experiment, other[0].experiment))
    ordered = sorted(k for k in keys if not named_in(k, LABEL_KEYS))
    groups = [Group({key: lookup(runs[0].experiment, key) for key in ordered}, runs)
              for runs in members]  # fmt: skip
    shared = [k for k in ordered if all(g.values[k] is not MISSING for g in groups)]
    short = [Group({k: g.values[k] for k in shared}, g.runs) for g in groups]
    return short if len({g.label for g in short}) == len(groups) else groups


#: how the run log's corpus hash and the validation windows are named in a refusal
CORPUS_HASH = "corpus sha256 (run_start)"
WINDOWS = "validation windows (training.batch_size x world_size x training.eval_batches)"


def _validation_set(record: RunRecord) -> dict[str, tuple[Any, str]]:
    """What decides the text a run's validation loss is measured on: by the key to name,
    the value compared and the value shown."""
    flat = flatten(record.experiment)
    keys = {k: (v, format_value(v)) for k, v in flat.items()
            if k.startswith(("data.", "tokenizer.")) and k not in NOT_DATA_KEYS}  # fmt: skip
    context = flat.get("model.context_length")
    keys["model.context_length"] = (context, format_value(context))
    world = (record.environment.get("world_size") or [1])[-1]
    batch, batches = flat.get("training.batch_size"), flat.get("training.eval_batches")
    if isinstance(batch, int) and isinstance(world, int) and isinstance(batches, int):
        keys[WINDOWS] = (batch * world * batches, f"{batch} x {world} x {batches}")
    keys[CORPUS_HASH] = (record.corpus_sha256, (record.corpus_sha256 or "")[:12])
    return keys


def check_same_validation_set(records: Sequence[RunRecord]) -> None:
    """Refuse, in one line naming two runs and the key, runs of different corpora,
    tokenizers or validation sets: their losses are not measured on the same text."""
    if not records:
        return
    first, first_keys = records[0], _validation_set(records[0])
    for record in records[1:]:
        keys = _validation_set(record)
        for key in dict.fromkeys([*first_keys, *keys]):  # the experiment's keys first
            mine, theirs = (
                first_keys.get(key, (None, "(absent)")),
                keys.get(key, (None, "(absent)")),
            )
            # what an older run's log did not record is unknown, not different
            unknown = None in (mine[0], theirs[0]) and key in (WINDOWS, CORPUS_HASH)
            if mine[0] != theirs[0] and not unknown:
                raise SlmkitError(
                    f"compare: runs {first.run_id} and {record.run_id} were not measured on the "
                    f"same validation set: {key} differs ({mine[1]} vs {theirs[1]}); "
                    "statistics compare runs of one corpus, tokenizer and validation set"
                )


def pick_baseline(groups: Sequence[Group], choices: Sequence[str]) -> int:
    """The index of the group every ``--baseline KEY=VALUE`` matches; the first without any.

    Errors name the option: a key the groups do not differ in, a value no group has, or
    choices that fit several groups.
    """
    if not choices:
        return 0
    keys = list(groups[0].values)
    matching = list(range(len(groups)))
    for choice in choices:
        try:
            parts, value = parse_override(choice)
        except ConfigError:
            raise SlmkitError(f"--baseline: {choice!r}: expected KEY=VALUE") from None
        key = ".".join(parts)
        if key not in keys:
            differing = ", ".join(keys) or "no key: there is one group"
            raise SlmkitError(
                f"--baseline: {key}: not a key the groups differ in (they differ in: {differing})"
            )
        fitting = [i for i, g in enumerate(groups) if _same(g.values[key], value)]
        if not fitting:
            have = ", ".join(dict.fromkeys(format_value(g.values[key]) for g in groups))
            raise SlmkitError(f"--baseline: {choice}: no group has that value ({key}: {have})")
        matching = [i for i in matching if i in fitting]
        if not matching:
            raise SlmkitError(f"--baseline: {' '.join(choices)}: no group has all these values")
    if len(matching) > 1:
        labels = "; ".join(groups[i].label for i in matching)
        raise SlmkitError(
            f"--baseline: {' '.join(choices)} fits {len(matching)} groups ({labels}): "
            "add --baseline KEY=VALUE for another key"
        )
    return matching[0]


def _same(have: Any, wanted: Any) -> bool:
    """A group's value equals a ``--baseline`` value (1 matches 1.0; 1e-3 matches 0.001)."""
    numbers = (int, float)
    if isinstance(have, numbers) and isinstance(wanted, numbers):
        both_bool = isinstance(have, bool) == isinstance(wanted, bool)
        return both_bool and float(have) == float(wanted)
    return bool(have == wanted)
