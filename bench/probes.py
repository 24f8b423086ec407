"""Probe cost: what an evaluation of the reference model costs with and without probes.

Three real :class:`slmkit.train.Trainer` objects of ``experiments/baseline.toml`` (run
folders in a temporary directory, so probe events go to a real ``log.jsonl``):

* ``no probes``: the baseline as it is;
* ``4 probes``: ``[[probes]]`` tables for the four built-ins (``induction``,
  ``previous_token``, ``logit_lens``, ``attention_entropy``) with their default options;
* ``disabled``: the same tables with ``enabled = false``.

Each timed evaluation is the trainer's own ``Trainer._evaluate`` (the validation pass,
the ``eval`` event, then the probes). The configurations are interleaved, rotating which
goes first each round, so load drift on the machine cancels; a round's figure is each
configuration's evaluation time minus that of ``no probes`` in the same round. Each
probe's ``measure`` is also timed alone, and a few training steps of ``no probes`` give
the share of a whole run: probes add their time once per evaluation, that is once every
``training.eval_every`` steps.

    uv run python -m bench probes [--quick | --smoke] [--device D] [--out DIR]
                                  [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import fmt_spread, machine_line, parse_args, spread, table
from bench.training import (
    EXPERIMENT,
    Contender,
    add_common_options,
    build_trainer,
    experiment_overrides,
    result_name,
    rotated,
    save_results,
    shown,
    sync,
)

PROBES = ("induction", "previous_token", "logit_lens", "attention_entropy")
#: ``disabled`` runs the code of ``no probes``: what it differs by is the noise floor
TARGET_DISABLED = 0.01


def probe_tables(enabled: bool) -> dict[str, Any]:
    """The ``[[probes]]`` array of the probed configurations."""
    return {"probes": [{"name": name, "enabled": enabled} for name in PROBES]}


def timed_evaluation(contender: Contender) -> float:
    """Wall seconds of one ``Trainer._evaluate`` (device synchronised)."""
    trainer = contender.trainer
    started = time.perf_counter()
    trainer._evaluate(contender.run)
    sync(trainer.device)
    return time.perf_counter() - started


def each_probe_alone(contender: Contender, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each probe's measurement alone (its ``Probes.measure``)."""
    from slmkit.probes import Probes

    probes = contender.trainer.probes
    seconds: dict[str, list[float]] = {}
    for probe in probes.probes:
        alone = Probes([probe], probes.model, probes.tokenizer, 1, 1)
        seconds[probe.entry.name] = []
        for _ in range(repeats):
            started = time.perf_counter()
            alone.measure(contender.run, 1)
            sync(contender.trainer.device)
            seconds[probe.entry.name].append(time.perf_counter() - started)
    return seconds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, write ``<out>/probes[-quick|-smoke].json``."""
    from slmkit.runlog import read_events

    parser = argparse.ArgumentParser(prog="bench.probes", description=__doc__.split("\n")[0])
    add_common_options(parser)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="an experiment override for every configuration (e.g. training.eval_batches=5)",
    )  # fmt: skip
    args = parse_args(parser, argv)
    if args.smoke:
        plan = {"rounds": 1, "steps": 1, "alone": 1}
    elif args.quick:
        plan = {"rounds": 3, "steps": 3, "alone": 2}
    else:
        plan = {"rounds": 8, "steps": 4, "alone": 5}
    plan["rounds"] = args.rounds or plan["rounds"]
    overrides = experiment_overrides(args, args.set)

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="slmkit-bench-probes-") as runs_dir:
        contenders = [
            Contender("no probes", build_trainer(overrides, runs_dir)),
            Contender("4 probes", build_trainer(overrides, runs_dir, tables=probe_tables(True))),
            Contender("disabled", build_trainer(overrides, runs_dir, tables=probe_tables(False))),
        ]
        plain = contenders[0].trainer
        model, t = plain.model, plain.exp.training
        disabled_builds = contenders[2].trainer.probes is not None
        print(f"{EXPERIMENT} " + " ".join(f"--set {o}" for o in overrides) + f"; {plain.device}")
        print(
            f"model: {model.n_params:,} parameters, context {model.dims.context_length}; "
            f"validation: {t.eval_batches} batch(es) of {t.batch_size} windows; probes: "
            f"{', '.join(PROBES)} (default options); the disabled tables build "
            + ("probes (!)" if disabled_builds else "nothing (trainer.probes is None)")
        )
        for c in contenders:
            c.steps(1)  # warm-up: the first step pays for lazy initialisation
        step_seconds = contenders[0].steps(plan["steps"])
        for c in contenders:
            c.trainer.state.step = t.max_steps  # the last step's evaluation: every probe due
            timed_evaluation(c)  # warm-up: the first pass pays for lazy initialisation
        evaluations: dict[str, list[float]] = {c.label: [] for c in contenders}
        for r in range(plan["rounds"]):
            for c in rotated(contenders, r):
                evaluations[c.label].append(timed_evaluation(c))
            print(f"round {r + 1}/{plan['rounds']} done", flush=True)
        alone = each_probe_alone(contenders[1], plan["alone"])
        logged = {
            c.label: sum(
                e["event"] == "probe" for e in read_events(Path(c.run.run_dir) / "log.jsonl")
            )
            for c in contenders
        }
        for c in contenders:
            c.close()

    base = evaluations["no probes"]
    configs: dict[str, Any] = {}
    for label, seconds in evaluations.items():
        configs[label] = {"eval_ms": spread([1e3 * s for s in seconds]),
                          "probe_events_logged": logged[label]}  # fmt: skip
        if label != "no probes":
            pairs = list(zip(seconds, base, strict=True))
            configs[label]["added_ms"] = spread([1e3 * (s - b) for s, b in pairs])
            configs[label]["added_share_of_eval"] = spread([s / b - 1 for s, b in pairs])
    step_ms = 1e3 * statistics.median(step_seconds)
    added_ms = configs["4 probes"]["added_ms"]["median"]
    per_interval_ms = t.eval_every * step_ms + 1e3 * statistics.median(base)
    run_share = added_ms / per_interval_ms if t.eval_every else None
    disabled = configs["disabled"]["added_share_of_eval"]
    disabled_met = abs(disabled["median"]) <= TARGET_DISABLED

    def pct(s: dict[str, float] | None) -> str:
        return "-" if s is None else fmt_spread({k: 100 * v for k, v in s.items()}) + " %"

    print()
    print(table(
        ["config", "ms per evaluation", "added ms", "added, share of the evaluation",
         "probe events"],
        [[label, fmt_spread(c["eval_ms"], "{:.0f}"),
          fmt_spread(c["added_ms"], "{:.0f}") if "added_ms" in c else "-",
          pct(c.get("added_share_of_eval")), c["probe_events_logged"]]
         for label, c in configs.items()],
    ))  # fmt: skip
    print(
        f"(median (min–max) over {plan['rounds']} interleaved round(s); added: per round, "
        "minus no probes' evaluation of the same round)"
    )
    probe_ms = {name: spread([1e3 * s for s in v]) for name, v in alone.items()}
    print()
    print(table(["probe", "ms per measurement, alone"],
                [[name, fmt_spread(s, "{:.0f}")] for name, s in probe_ms.items()]))  # fmt: skip
    print()
    share = "-" if run_share is None else f"{100 * run_share:.2f} %"
    print(
        f"a training step: {step_ms:.0f} ms (median of {len(step_seconds)}, after one "
        f"untimed); with "
        f"eval_every = {t.eval_every}, the 4 probes add {added_ms:.0f} ms per "
        f"{t.eval_every} step(s) + 1 evaluation = {share} of the run's time"
    )
    print(
        f"disabled tables ~0 % (|median| <= {100 * TARGET_DISABLED:.0f} % of an evaluation): "
        f"{'met' if disabled_met else 'NOT met'}"
        + ("" if disabled_builds else " (they build nothing: the no-probes code path, so "
           "their spread across 0 is this machine's noise floor)")
    )  # fmt: skip
    if args.smoke:
        print("(smoke run: tiny model, figures not meaningful)")

    result = {
        "experiment": EXPERIMENT,
        "config": {
            "overrides": overrides,
            "probes": probe_tables(True)["probes"],
            "plan": plan,
            "device": str(plain.device),
        },
        "configs": configs,
        "probes_alone_ms": probe_ms,
        "step_ms": step_ms,
        "run_share": run_share,
        "targets": {
            "disabled_about_0": disabled_met,
            "disabled_builds_nothing": not disabled_builds,
        },
    }
    path = save_results(result_name("probes", args), result, args.out)
    print(f"results: {shown(path)}")
    return result
