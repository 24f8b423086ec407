"""The scaling-law study of docs/scaling.md: five GPT sizes on the embedded corpus, fitted,
and a sixth, larger one held out and predicted.

Trains ``experiments/scaling.toml`` once per size of :data:`FITTED` and then
:data:`HELD_OUT` (``n_layers``, ``d_model``, ``n_heads``; ``d_ff = 4 d_model``), each on the
same 2,048,000 tokens, through the Python API (a run folder each in ``--runs-dir``), then
fits ``L(N) = E + A / N^alpha`` to the five with the held-out size left out, as

    uv run slmkit scaling RUN1 ... RUN5 HELD --leave-out HELD --png P --out R

would, and prints the fit, the prediction against the measured loss and every timing.

    uv run python -m bench scaling_study [--threads N] [--runs-dir DIR] [--png FILE]
    uv run python -m bench scaling_study --png docs/images/scaling.png   # the docs' picture

``--smoke`` trains each size 4 steps on one validation batch: a check that the study runs,
whose fit means nothing (it may not even converge; that is reported, not raised).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import RESULTS_DIR, ROOT, machine_line, parse_args, table, write_results

EXPERIMENT = "experiments/scaling.toml"
#: (n_layers, d_model, n_heads) of the sizes fitted, heads of 16 dimensions: 13k to 600k
#: non-embedding parameters, 2 to 4.4x apart
FITTED = ((1, 32, 2), (2, 48, 3), (3, 64, 4), (4, 80, 5), (4, 112, 7))
#: the larger size left out of the fit and predicted: 1.24M, 2.1x the largest fitted
HELD_OUT = (5, 144, 9)
SMOKE_OVERRIDES = ("training.max_steps=4", "schedule.warmup_steps=1", "training.eval_every=0",
                   "training.eval_batches=1", "training.log_every=1")  # fmt: skip
#: what the study must show (the issue's bar): the prediction within this many nats
TARGET_ERROR = 0.05


def size_overrides(size: tuple[int, int, int]) -> list[str]:
    """``--set`` values of one size: depth, width, heads, and d_ff = 4 d_model."""
    layers, width, heads = size
    return [f"model.n_layers={layers}", f"model.d_model={width}", f"model.n_heads={heads}",
            f"model.d_ff={4 * width}"]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the sizes, fit, print, write the picture, the report and the results JSON."""
    parser = argparse.ArgumentParser(prog="bench.scaling_study",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="4 steps a size: a smoke test")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--runs-dir", default=None,
                        help="where the run folders go (default: runs/scaling; with --smoke, "
                        "a temporary folder)")  # fmt: skip
    parser.add_argument("--png", default=None, help="the picture (default: in bench/results)")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples")
    args = parse_args(parser, argv)
    if args.runs_dir is not None or not args.smoke:
        return study(args, ROOT / (args.runs_dir or "runs/scaling"))
    with tempfile.TemporaryDirectory(prefix="slmkit-bench-scaling-") as runs_dir:
        return study(args, Path(runs_dir))


def study(args: argparse.Namespace, runs_dir: Path) -> dict[str, Any]:
    """Train every size into ``runs_dir``, fit, print and write (see the module's doc)."""

    from slmkit.config.resolve import load_experiment
    from slmkit.errors import SlmkitError
    from slmkit.plugins import PluginManager
    from slmkit.progress import Console
    from slmkit.runs import read_run
    from slmkit.scaling_plot import study_png
    from slmkit.scaling_report import report_html, study_json, study_text, write_output
    from slmkit.scaling_runs import fit_runs
    from slmkit.train import Trainer

    study_started = time.perf_counter()
    print(machine_line())
    manager = PluginManager().load()
    common = [*(SMOKE_OVERRIDES if args.smoke else ()),
              *([f"training.threads={args.threads}"] if args.threads else [])]  # fmt: skip
    runs: list[dict[str, Any]] = []
    for size in (*FITTED, HELD_OUT):
        overrides = [*common, *size_overrides(size)]
        print(f"\n{EXPERIMENT} " + " ".join(f"--set {o}" for o in overrides), flush=True)
        started = time.perf_counter()
        exp = load_experiment(ROOT / EXPERIMENT, manager, overrides)
        trainer = Trainer(exp, manager, EXPERIMENT, runs_dir=runs_dir,
                          console=Console(plain_interval=30.0), overrides=overrides)  # fmt: skip
        summary = trainer.run()
        runs.append({
            "size": list(size), "run_dir": summary["run_dir"],
            "non_embedding_params": trainer.model.n_non_embedding_params,
            "steps": summary["steps"], "val_loss": summary["val_loss"],
            "tokens_per_s": summary["tokens_per_s"], "wall_s": time.perf_counter() - started,
            "held_out": size == HELD_OUT,
        })  # fmt: skip
    train_s = time.perf_counter() - study_started

    png = Path(args.png) if args.png else RESULTS_DIR / "scaling_study.png"
    report = RESULTS_DIR / "scaling_study.html"
    held = runs[-1]["run_dir"]
    folders = [r["run_dir"] for r in runs]
    print(f"\nuv run slmkit scaling {' '.join(folders)} --leave-out {held} --png {png} "
          f"--out {report}\n")  # fmt: skip
    fit_started = time.perf_counter()
    result: dict[str, Any] = {"runs": runs, "smoke": args.smoke}
    try:
        records = [read_run(folder) for folder in folders]
        study = fit_runs(records, leave_out=records[-1], resamples=args.resamples)
    except SlmkitError as exc:
        print(f"the fit failed: {exc}")
        result["fit"] = {"error": str(exc)}
    else:
        text = study_text(study)
        print(text, end="")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        picture = study_png(study)
        write_output(png, picture)
        write_output(report, report_html(study, picture, [runs_dir]).encode())
        print(f"wrote {png} and {report}")
        result["fit"] = study_json(study)
    fit_s = time.perf_counter() - fit_started
    wall_s = time.perf_counter() - study_started

    print()
    rows = [[f"{r['size'][0]} x {r['size'][1]}" + (" (held out)" if r["held_out"] else ""),
             f"{r['non_embedding_params']:,}", r["steps"], f"{r['val_loss']:.4f}",
             f"{r['tokens_per_s']:,.0f}", f"{r['wall_s']:.0f}"] for r in runs]  # fmt: skip
    print(table(["layers x d_model", "N", "steps", "val loss", "tokens/s", "wall s"], rows))
    print(f"\ntraining {train_s:.0f} s, fit {fit_s:.1f} s, study {wall_s:.0f} s "
          f"({wall_s / 60:.1f} min)")  # fmt: skip
    held_out = (result["fit"].get("held_out") or {}) if "error" not in result["fit"] else {}
    if held_out:
        met = abs(held_out["error"]) <= TARGET_ERROR
        verdict = "met" if met else "NOT met"
        smoke = " (smoke run: not meaningful)" if args.smoke else ""
        print(f"target: the held-out size predicted within {TARGET_ERROR} nats: {verdict}{smoke}")
    result.update({"config": {"experiment": EXPERIMENT, "fitted": FITTED, "held_out": HELD_OUT,
                              "overrides": common},
                   "train_s": train_s, "fit_s": fit_s, "wall_s": wall_s})  # fmt: skip
    path = write_results("scaling_study" + ("-smoke" if args.smoke else ""), result)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return result


if __name__ == "__main__":
    main()
