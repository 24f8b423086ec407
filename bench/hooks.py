"""Forward-hook overhead: training ms/step of the reference model with and without hooks.

Three real :class:`slmkit.train.Trainer` objects of ``experiments/baseline.toml`` (run
folders in a temporary directory, so hook metrics go to a real ``log.jsonl``):

* ``no hooks``: the baseline as it is;
* ``activation_stats``: one ``[[forward_hooks]]`` table, ``activation_stats`` on
  ``blocks.*.hook_resid_post`` (every block) with ``every = 1``: watched every step;
* ``disabled``: the same table with ``enabled = false``.

Each timed step is the trainer's own ``Stepper.set_lr`` + ``Stepper.step``. The configurations
are interleaved (a block of steps of each per round, rotating which goes first: ABC,
BCA, CAB...) so load drift on the machine cancels; the overhead of a round is its median
step time over that of ``no hooks`` in the same round, minus one (in wall and in process
CPU time). On a loaded machine that noise floor can exceed the effect, so the hook's work
is also timed alone (attach, observe at every watched point, flush, log) on real
activations, as a share of the no-hooks step. Targets: <= 5 % with activation_stats,
about 0 % disabled.

The guard that keeps observers from changing the model (the tensor's version counter,
read before and after each ``observe``) is timed on its own too, per observed activation,
beside what handing each observer a copy instead would cost.

    uv run python -m bench hooks [--quick | --smoke] [--precision P] [--device D] [--out DIR]
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

TARGET_STATS = 0.05
TARGET_DISABLED = 0.01  # "about 0 %"
POINTS = ["blocks.*.hook_resid_post"]


def hook_table(enabled: bool) -> dict[str, Any]:
    """The ``[[forward_hooks]]`` array of the hooked configurations."""
    return {
        "forward_hooks": [
            {"name": "activation_stats", "points": POINTS, "every": 1, "enabled": enabled}
        ]
    }


def capture_activations(contender: Contender, names: Sequence[str]) -> dict[str, Any]:
    """The activations at ``names`` of one forward pass of a validation batch."""
    import torch

    trainer = contender.trainer
    points = trainer.model.hook_points
    captured: dict[str, torch.Tensor] = {}
    for name in names:
        points[name].observers.append(lambda point, x: captured.__setitem__(point, x.clone()))
    x, _ = trainer.data.val_batches[0]
    with torch.no_grad():
        trainer.model(x.to(trainer.device))
    trainer.forward_hooks.detach()
    return captured


class _Reader:
    """A forward hook that does nothing: what remains is the kernel's guard around it."""

    phases = ("train",)

    def observe(self, point: str, activation: Any) -> None:
        pass


def guard_cost(activations: dict[str, Any], repeats: int) -> dict[str, dict[str, float]]:
    """Microseconds per observed activation: the unguarded call, the guarded one, a copy.

    ``unguarded``: the observer called as the kernel calls it, minus the version check;
    ``guarded``: through :meth:`ForwardHooks._observer` (the check included); ``copy``:
    ``activation.clone()``, what handing observers a private copy would add instead.
    """
    import torch

    from slmkit.hooks import EnabledHook, ForwardHooks

    entry = EnabledHook("forward_hook", "reader", "bench", _Reader())
    guarded = ForwardHooks._observer(entry)

    def unguarded(point: str, x: torch.Tensor) -> None:
        with torch.no_grad():
            entry.call("observe", point, x)

    def copy(point: str, x: torch.Tensor) -> None:
        x.clone()

    calls = 200
    ways = {"unguarded": unguarded, "guarded": guarded, "copy": copy}
    per_call: dict[str, list[float]] = {label: [] for label in ways}
    for fn in ways.values():  # warm up: the first calls pay for lazy initialisation
        for point, x in activations.items():
            fn(point, x)
    for r in range(repeats):  # interleaved, rotating which goes first, as the steps above
        labels = list(ways)
        for label in labels[r % 3 :] + labels[: r % 3]:
            started = time.perf_counter()
            for _ in range(calls):
                for point, x in activations.items():
                    ways[label](point, x)
            elapsed = time.perf_counter() - started
            per_call[label].append(1e6 * elapsed / (calls * len(activations)))
    return {label: spread(values) for label, values in per_call.items()}


def direct_cost(contender: Contender, repeats: int) -> list[float]:
    """Wall seconds of one step's hook work, timed alone, on real activations.

    Everything ``activation_stats`` adds to a step, through ``ForwardHooks.watching`` as
    the trainer uses it: attach, each watched point calling its observer (``observe``: the
    statistics), then detach, ``flush`` with its one device read, and the log event.
    The activations come from one forward pass of a validation batch (training shape).
    """
    trainer = contender.trainer
    hooks, points = trainer.forward_hooks, trainer.model.hook_points
    names = hooks.hooks[0].points
    captured = capture_activations(contender, names)
    seconds = []
    for i in range(repeats):
        step = trainer.state.step + 1 + i
        started = time.perf_counter()
        with hooks.watching(contender.run, "train", step):
            for name in names:
                points[name](captured[name])  # what the block's hook point does mid-forward
        sync(trainer.device)
        seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write ``<out>/hooks[-quick|-smoke].json``."""
    from slmkit.runlog import read_events

    parser = argparse.ArgumentParser(prog="bench.hooks", description=__doc__.split("\n")[0])
    add_common_options(parser)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per config")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--block", type=int, default=None, help="steps per config per round")
    args = parse_args(parser, argv)
    if args.smoke:
        plan = {"warmup": 1, "rounds": 1, "block": 1, "direct": 2}
    elif args.quick:
        plan = {"warmup": 1, "rounds": 3, "block": 2, "direct": 10}
    else:
        plan = {"warmup": 3, "rounds": 10, "block": 3, "direct": 30}
    plan = {k: getattr(args, k, None) or v for k, v in plan.items()}
    overrides = experiment_overrides(args, [f"training.precision={args.precision}"])

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="slmkit-bench-hooks-") as runs_dir:
        contenders = [
            Contender("no hooks", build_trainer(overrides, runs_dir)),
            Contender(
                "activation_stats", build_trainer(overrides, runs_dir, tables=hook_table(True))
            ),
            Contender("disabled", build_trainer(overrides, runs_dir, tables=hook_table(False))),
        ]
        first = contenders[0].trainer
        model, device, t = first.model, first.device, first.exp.training
        tokens_per_step = t.batch_size * t.grad_accum_steps * model.dims.context_length
        watched = contenders[1].trainer.forward_hooks.hooks[0].points
        disabled_attaches = contenders[2].trainer.forward_hooks is not None
        print(f"{EXPERIMENT} " + " ".join(f"--set {o}" for o in overrides) + f"; device {device}")
        print(
            f"model: {model.n_params:,} parameters; {tokens_per_step:,} tokens/step; "
            f"activation_stats watches {len(watched)} points ({', '.join(watched)}) every step; "
            "the disabled table attaches "
            + ("hooks (!)" if disabled_attaches else "nothing (trainer.forward_hooks is None)")
        )
        print(
            f"{plan['warmup']} warm-up step(s) each, then {plan['rounds']} round(s) of "
            f"{plan['block']} step(s) per configuration, interleaved"
        )
        for c in contenders:
            c.steps(plan["warmup"])
        per_round: dict[str, list[float]] = {c.label: [] for c in contenders}
        per_round_cpu: dict[str, list[float]] = {c.label: [] for c in contenders}
        for r in range(plan["rounds"]):
            for c in rotated(contenders, r):
                per_round[c.label].append(statistics.median(c.steps(plan["block"])))
                per_round_cpu[c.label].append(statistics.median(c.cpu_times[-plan["block"] :]))
            print(f"round {r + 1}/{plan['rounds']} done", flush=True)
        logged = {
            c.label: sum(
                e["event"] == "forward_hook" for e in read_events(Path(c.run.run_dir) / "log.jsonl")
            )
            for c in contenders
        }
        direct = direct_cost(contenders[1], plan["direct"])
        guard = guard_cost(capture_activations(contenders[1], watched), plan["direct"])
        for c in contenders:
            c.close()

    configs: dict[str, Any] = {}
    for c in contenders:
        times = c.times[plan["warmup"] :]
        configs[c.label] = {
            "steps_timed": len(times),
            "ms_per_step": spread([1e3 * s for s in times]),
            "cpu_ms_per_step": spread([1e3 * s for s in c.cpu_times[plan["warmup"] :]]),
            "tokens_per_s": spread([tokens_per_step / s for s in times]),
            "round_medians_ms": [1e3 * s for s in per_round[c.label]],
            "forward_hook_events_logged": logged[c.label],
            "steps_total": c.trainer.state.step,
        }
        if c.label != "no hooks":
            for key, rounds in (("", per_round), ("_cpu", per_round_cpu)):
                pairs = list(zip(rounds[c.label], rounds["no hooks"], strict=True))
                configs[c.label][f"overhead{key}"] = spread([s / b - 1 for s, b in pairs])
                configs[c.label][f"overhead{key}_ms_per_step"] = spread(
                    [1e3 * (s - b) for s, b in pairs]
                )
    base_ms = configs["no hooks"]["ms_per_step"]["median"]
    direct_ms = spread([1e3 * s for s in direct])
    direct_share = direct_ms["median"] / base_ms
    stats_met = configs["activation_stats"]["overhead"]["median"] <= TARGET_STATS
    disabled = configs["disabled"]["overhead"]
    disabled_met = abs(disabled["median"]) <= TARGET_DISABLED
    # nothing attached: the very code path of "no hooks", so any difference is noise
    disabled_noise = not disabled_attaches and disabled["min"] <= 0 <= disabled["max"]

    ms_fmt = "{:.0f}" if device.type == "cpu" else "{:.2f}"

    def pct(s: dict[str, float] | None) -> str:
        return "-" if s is None else fmt_spread({k: 100 * v for k, v in s.items()}) + " %"

    rows = [
        [
            label,
            c["steps_timed"],
            fmt_spread(c["ms_per_step"], ms_fmt),
            fmt_spread(c["tokens_per_s"], "{:.0f}"),
            pct(c.get("overhead")),
            "-" if "overhead" not in c else fmt_spread(c["overhead_ms_per_step"], ms_fmt),
            pct(c.get("overhead_cpu")),
            c["forward_hook_events_logged"],
        ]
        for label, c in configs.items()
    ]
    print()
    print(
        table(
            [
                "config",
                "steps timed",
                "ms/step",
                "tokens/s",
                "overhead vs no hooks",
                "ms/step added",
                "overhead, CPU time",
                "forward_hook events",
            ],
            rows,
        )
    )
    print(
        "(ms/step, tokens/s: median (min–max) over timed steps; overhead: per round, the "
        "config's median step over no hooks' of the same round, median (min–max) over "
        f"{plan['rounds']} round(s); CPU time: the same with process CPU seconds)"
    )
    print(
        f"activation_stats work timed alone (attach, {len(watched)} x observe, flush + log): "
        f"{fmt_spread(direct_ms, '{:.1f}')} ms per step over {len(direct)} repeat(s) = "
        f"{100 * direct_share:.2f} % of the no-hooks median step"
    )
    guard_us = guard["guarded"]["median"] - guard["unguarded"]["median"]
    guard_share = guard_us * len(watched) / 1e3 / base_ms
    print(
        "the in-place guard, per observed activation: "
        f"{fmt_spread(guard['guarded'], '{:.2f}')} µs guarded vs "
        f"{fmt_spread(guard['unguarded'], '{:.2f}')} µs unguarded (+{guard_us:.2f} µs; "
        f"x {len(watched)} points = {100 * guard_share:.2g} % of the no-hooks step); "
        f"a copy instead: {fmt_spread(guard['copy'], '{:.1f}')} µs"
    )
    print(
        f"targets: activation_stats <= {100 * TARGET_STATS:.0f} %: "
        f"{'met' if stats_met else 'NOT met'} (interleaved median), "
        f"{'met' if direct_share <= TARGET_STATS else 'NOT met'} (work timed alone); "
        f"disabled ~0 % (|median| <= {100 * TARGET_DISABLED:.0f} %): "
        f"{'met' if disabled_met else 'NOT met'}"
        + (
            " (it attaches nothing, so it runs the no-hooks code: its spread across 0 is "
            "the noise floor of this machine)"
            if disabled_noise
            else ""
        )
    )
    if args.smoke:
        print("(smoke run: tiny model, figures not meaningful)")

    result = {
        "experiment": EXPERIMENT,
        "config": {
            "overrides": overrides,
            "forward_hooks": hook_table(True)["forward_hooks"],
            "watched_points": watched,
            "disabled_table_attaches_hooks": disabled_attaches,
            "device": str(device),
            "n_params": model.n_params,
            "tokens_per_step": tokens_per_step,
            "plan": plan,
            "quick": args.quick,
            "smoke": args.smoke,
        },
        "configs": configs,
        "direct_cost_ms_per_step": direct_ms,
        "direct_cost_share_of_step": direct_share,
        "guard_us_per_activation": guard,
        "guard_share_of_step": guard_share,
        "targets": {
            "activation_stats_overhead": TARGET_STATS,
            "activation_stats_met": stats_met,
            "activation_stats_direct_met": direct_share <= TARGET_STATS,
            "disabled_overhead": TARGET_DISABLED,
            "disabled_met": disabled_met,
            "disabled_attaches_nothing_and_spread_spans_zero": disabled_noise,
        },
    }
    path = save_results(result_name("hooks", args), result, args.out)
    print(f"wrote {shown(path)}")
    return result


if __name__ == "__main__":
    main()
