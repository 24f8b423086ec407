"""Sampling speed: ``LanguageModel.generate``'s fast decode step, the forward path, recompute.

The reference model: ``experiments/baseline.toml`` built through ``slmkit.build`` (4
layers, d_model 256, 4 heads, d_ff 1024, context 256, the char tokenizer's 99-token
vocabulary), randomly initialised: speed does not depend on the weights. Three paths:

    fast       KV cache, one token per step through the blocks' ``decode`` (the default)
    forward    KV cache, every token through ``forward``: sampling before issue 20
    recompute  no cache (``use_cache=False``): the whole window again for each token

Each repeat times the paths back to back (alternating their order), so the ratios of a
repeat (forward / fast: issue 20; recompute / fast: issues 3 and 5) are measured under
the same machine load.

It also checks that fast and forward sample the same tokens over all new tokens (same
generator seed; they restart alike past the window), that forward and recompute do for
as long as the whole sequence fits in the context window (after that they legitimately
differ: recompute slides the window one token at a time, the cache restarts from the
last three quarters of it), and how far the cached logits are from the recomputed ones.

    uv run python -m bench sampling [--quick] [--new-tokens N] [--repeats R] [--threads 1,2]
                                    [--paths fast,forward,recompute] [--profile]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench import ROOT, fmt_spread, machine_line, parse_args, spread, table, write_results

PROMPT = "\nROMEO:\n"
TARGET_SPEEDUP = 5.0  # issue 3
TARGET_SPEEDUP_ISSUE_5 = 10.0
TARGET_FAST = 2.0  # issue 20: fast decode step / forward path tokens/s

#: how each path calls ``generate``, and its label in the table
PATHS: dict[str, tuple[dict[str, bool], str]] = {
    "fast": ({"use_cache": True, "fast": True}, "KV cache, decode step"),
    "forward": ({"use_cache": True, "fast": False}, "KV cache, forward"),
    "recompute": ({"use_cache": False}, "recompute"),
}
#: the ratios reported: (name, slower path, faster path)
RATIOS = [("fast/forward", "forward", "fast"), ("cache/recompute", "recompute", "fast")]
#: each ratio's targets: (speed-up, the issue that set it)
TARGETS = {
    "fast/forward": [(TARGET_FAST, "issue 20")],
    "cache/recompute": [(TARGET_SPEEDUP, "issue 3"), (TARGET_SPEEDUP_ISSUE_5, "issue 5")],
}


REFERENCE_SHAPE = {
    "n_layers": 4,
    "d_model": 256,
    "n_heads": 4,
    "d_ff": 1024,
    "context_length": 256,
    "vocab_size": 99,
}


def build_reference_model(seed: int = 0) -> Any:
    """The model of ``experiments/baseline.toml`` through ``slmkit.build``, random weights.

    Built the way a run builds it (plugin manager, block factory, the block's own
    position policy, tied embeddings if the experiment asks), so the benchmark follows
    the reference configuration. Warns if its shape is no longer the reference shape.
    """
    from slmkit.build import build_model, build_tokenizer
    from slmkit.config.resolve import load_experiment
    from slmkit.plugins import PluginManager

    manager = PluginManager().load()
    exp = load_experiment(ROOT / "experiments" / "baseline.toml", manager)
    tokenizer = build_tokenizer(exp)
    torch.manual_seed(seed)
    model = build_model(exp, tokenizer)
    shape = {k: getattr(model.dims, k) for k in REFERENCE_SHAPE}
    if shape != REFERENCE_SHAPE:
        print(f"warning: baseline.toml's shape {shape} is not the reference {REFERENCE_SHAPE}")
    return model.eval(), tokenizer


def timed_generate(
    model: Any, prompt: torch.Tensor, n_new: int, *, path: str, seed: int
) -> tuple[float, torch.Tensor, float]:
    """Wall seconds to sample ``n_new`` tokens, the tokens (prompt included), CPU seconds.

    CPU seconds (``time.process_time``, all threads of this process) are far less
    sensitive than wall time to other jobs on the machine, at least with one thread (with
    more, OpenMP workers spin while they wait, which counts as CPU time).
    """
    generator = torch.Generator().manual_seed(seed)
    cpu, start = time.process_time(), time.perf_counter()
    out = model.generate(prompt, n_new, generator=generator, **PATHS[path][0])
    return time.perf_counter() - start, out, time.process_time() - cpu


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first differing position of two 1-D token tensors (None: equal)."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    if len(diff):
        return int(diff[0])
    return None if len(a) == len(b) else n


@torch.no_grad()
def logit_gap(model: Any, tokens: torch.Tensor, n_prompt: int) -> dict[str, float]:
    """Max |cached - recomputed| logit over one context window fed token by token."""
    from slmkit.components import KVCache

    full, _ = model(tokens)
    caches = [KVCache() for _ in model.blocks]
    first, _ = model(tokens[:, :n_prompt], caches=caches)
    steps = [first]
    for t in range(n_prompt, tokens.shape[1]):
        logits, _ = model(tokens[:, t : t + 1], caches=caches)
        steps.append(logits)
    cached = torch.cat(steps, dim=1)
    return {
        "max_abs_diff": float((cached - full).abs().max()),
        "max_abs_logit": float(full.abs().max()),
        "positions": int(tokens.shape[1]),
    }


def measure(
    model: Any, prompt: torch.Tensor, n_new: int, repeats: int, seed: int, paths: Sequence[str]
) -> dict[str, Any]:
    """Time every path ``repeats`` times, back to back, at the current thread count."""
    # warm-up: first calls pay for allocator growth and kernel selection
    for path in paths:
        timed_generate(model, prompt, 16, path=path, seed=seed)
    times: dict[str, list[float]] = {path: [] for path in paths}
    cpu_times: dict[str, list[float]] = {path: [] for path in paths}
    outputs: dict[str, torch.Tensor] = {}
    ratios: dict[str, list[float]] = {name: [] for name, *_ in ratios_of(paths)}
    cpu_ratios: dict[str, list[float]] = {name: [] for name, *_ in ratios_of(paths)}
    for r in range(repeats):
        this, this_cpu = {}, {}
        for path in paths if r % 2 == 0 else list(reversed(paths)):
            seconds, out, cpu = timed_generate(model, prompt, n_new, path=path, seed=seed)
            this[path], this_cpu[path] = seconds, cpu
            times[path].append(seconds)
            cpu_times[path].append(cpu)
            outputs[path] = out[0]
        for name, slow, fast in ratios_of(paths):
            ratios[name].append(this[slow] / this[fast])
            cpu_ratios[name].append(this_cpu[slow] / this_cpu[fast])
    tok_s = {path: [n_new / s for s in values] for path, values in times.items()}
    return {
        "seconds": times,
        "cpu_seconds": cpu_times,
        "tokens_per_s": {path: {**spread(v), "all": v} for path, v in tok_s.items()},
        "ms_per_token": {
            path: spread([1e3 * s / n_new for s in values]) for path, values in times.items()
        },
        "speedup": {name: {**spread(v), "all": v} for name, v in ratios.items()},
        "speedup_cpu_time": {name: {**spread(v), "all": v} for name, v in cpu_ratios.items()},
        "outputs": outputs,
    }


def profile_path(
    model: Any, prompt: torch.Tensor, n_new: int, path: str, seed: int, top: int = 12
) -> dict[str, Any]:
    """Where a path's time goes (torch.profiler): aten calls and self CPU µs per new token.

    The prompt's prefill and the restarts past the window are included, as in the timings.
    """
    from torch.profiler import ProfilerActivity, profile

    timed_generate(model, prompt, 16, path=path, seed=seed)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_generate(model, prompt, n_new, path=path, seed=seed)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "aten_calls_per_token": sum(e.count for e in events) / n_new,
        "self_cpu_us_per_token": sum(e.self_cpu_time_total for e in events) / n_new,
        "top": [
            {
                "op": e.key,
                "calls_per_token": e.count / n_new,
                "self_cpu_us_per_token": e.self_cpu_time_total / n_new,
            }
            for e in events[:top]
        ],
    }


def products_alone(model: Any, rounds: int = 10, n: int = 50) -> dict[str, Any]:
    """µs for one token's matrix-vector products alone, fp32 and with bf16 weights.

    The 16 ``F.linear`` of the blocks and the head, one after another as a decode step
    runs them (their weights, 12.7 MB in fp32, streamed once per token), without anything
    else: the floor under any step that computes the same products. bf16: the weights
    stored in bf16, the input cast (what "bf16 weights for sampling" would run); rounds
    alternate the two, min and median of the rounds.
    """
    linears = [m for block in model.blocks for m in block.modules() if isinstance(m, nn.Linear)]
    linears.append(model.head)
    contenders = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            weights = [
                (m.weight.to(dtype), None if m.bias is None else m.bias.to(dtype)) for m in linears
            ]
            inputs = [torch.randn(1, w.shape[1]).to(dtype) for w, _ in weights]
            contenders[str(dtype).removeprefix("torch.")] = weights, inputs
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for r in range(rounds):
            for name in contenders if r % 2 == 0 else list(reversed(contenders)):
                weights, inputs = contenders[name]
                start = time.perf_counter()
                for _ in range(n):
                    for (w, b), x in zip(weights, inputs, strict=True):
                        F.linear(x, w, b)
                times[name].append(1e6 * (time.perf_counter() - start) / n)
    return {"n_products": len(linears), **{name: spread(v) for name, v in times.items()}}


def ratios_of(paths: Sequence[str]) -> list[tuple[str, str, str]]:
    """The ratios whose two paths are both measured."""
    return [(name, slow, fast) for name, slow, fast in RATIOS if {slow, fast} <= set(paths)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write ``bench/results/sampling.json``."""
    parser = argparse.ArgumentParser(prog="bench.sampling", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat of 200 new tokens")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 500 (quick 200)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (quick 1)")
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated torch thread counts to measure, e.g. 1,2 (default: torch's)",
    )
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated paths to time, of {', '.join(PATHS)} (default: all)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the fast and forward paths at 1 thread: aten calls, top ops per token",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, argv)
    n_new = args.new_tokens or (200 if args.quick else 500)
    repeats = args.repeats or (1 if args.quick else 5)
    paths = [p for p in PATHS if p in args.paths.split(",")]
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown or not paths:
        parser.error(f"--paths: unknown {sorted(unknown)}; choose among {', '.join(PATHS)}")
    default_threads = torch.get_num_threads()
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [default_threads]

    model, tokenizer = build_reference_model(args.seed)
    context = model.dims.context_length
    prompt = torch.tensor([tokenizer.encode(PROMPT)], dtype=torch.long)
    n_prompt = prompt.shape[1]
    print(machine_line())
    print(
        f"model: {model.n_params:,} parameters, context {context}; prompt {n_prompt} tokens, "
        f"{n_new} new tokens, {repeats} repeat(s) per path, temperature 1.0"
    )

    per_threads: dict[int, dict[str, Any]] = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        per_threads[threads] = measure(model, prompt, n_new, repeats, args.seed, paths)
    profiles: dict[str, Any] = {}
    products: dict[str, Any] = {}
    if args.profile:
        torch.set_num_threads(1)
        profiles = {
            p: profile_path(model, prompt, n_new, p, args.seed) for p in ("fast", "forward")
        }
        products = products_alone(model)
    torch.set_num_threads(default_threads)

    # identity: fast and forward over every new token (fast samples regardless of --paths:
    # the claim is checked even when only other paths are timed) ...
    last = per_threads[thread_counts[-1]]["outputs"]
    outputs = {
        path: last[path]
        if path in last
        else timed_generate(model, prompt, n_new, path=path, seed=args.seed)[1][0]
        for path in ("fast", "forward")
    }
    fast_mismatch = first_mismatch(outputs["fast"], outputs["forward"])
    # ... forward and recompute while the whole sequence fits in the context window
    n_fit = context - n_prompt + 1
    _, fit_cache, _ = timed_generate(model, prompt, n_fit, path="forward", seed=args.seed)
    _, fit_recompute, _ = timed_generate(model, prompt, n_fit, path="recompute", seed=args.seed)
    fit_mismatch = first_mismatch(fit_cache[0], fit_recompute[0])
    long_mismatch = (
        first_mismatch(last["fast"], last["recompute"])
        if {"fast", "recompute"} <= set(last)
        else None
    )
    gap = logit_gap(model, fit_cache[:, :context], n_prompt)

    rows = []
    for threads, m in per_threads.items():
        for path in paths:
            rows.append(
                [
                    threads,
                    PATHS[path][1],
                    fmt_spread(m["tokens_per_s"][path]),
                    fmt_spread(m["ms_per_token"][path], "{:.2f}"),
                    fmt_spread(spread(m["seconds"][path]), "{:.2f}"),
                    fmt_spread(spread(m["cpu_seconds"][path]), "{:.2f}"),
                ]
            )
        for name, *_ in ratios_of(paths):
            rows.append(
                [
                    threads,
                    f"speed-up {name}",
                    fmt_spread(m["speedup"][name], "{:.2f}") + "x",
                    "",
                    "",
                    fmt_spread(m["speedup_cpu_time"][name], "{:.2f}") + "x",
                ]
            )
    print()
    print(
        table(
            [
                "threads",
                "path",
                "tokens/s median (min–max)",
                "ms/token",
                f"wall s for {n_new} tokens",
                "CPU s",
            ],
            rows,
        )
    )
    print(
        "\n(speed-up a/b = b's time / a's time in the same repeat, wall and CPU time; "
        "median (min–max) over repeats)"
    )
    met: dict[str, dict[str, bool]] = {}
    for threads, m in per_threads.items():
        for name, *_ in ratios_of(paths):
            median = m["speedup"][name]["median"]
            verdicts = "; ".join(
                f">= {target:g}x ({issue}): {'met' if median >= target else 'NOT met'}"
                for target, issue in TARGETS[name]
            )
            met.setdefault(name, {})[str(threads)] = all(median >= t for t, _ in TARGETS[name])
            print(
                f"{threads} thread(s): {name} {fmt_spread(m['speedup'][name], '{:.2f}')}x wall, "
                f"{fmt_spread(m['speedup_cpu_time'][name], '{:.2f}')}x CPU time; at 500 new "
                "tokens (median): "
                + (verdicts if n_new == 500 else f"not evaluated (measured at {n_new} new tokens)")
            )
    print(
        f"fast and forward sample the same tokens over all {n_new} new tokens (same seed): "
        + ("yes" if fast_mismatch is None else f"NO, first difference at {fast_mismatch}")
    )
    same = fit_mismatch is None
    print(
        f"forward and recompute: identical tokens while the sequence fits the context "
        f"({n_fit} new tokens, same seed): "
        + ("yes" if same else f"NO, first difference at position {fit_mismatch}")
    )
    if long_mismatch is not None:
        after = (
            f"first difference at position {long_mismatch} (new token {long_mismatch - n_prompt})"
        )
        if long_mismatch >= context:
            after += "; expected past the window, where recompute slides and the cache restarts"
        print(f"fast and recompute over all {n_new} new tokens: {after}")
    print(
        f"max |cached - recomputed logit| over {gap['positions']} positions: "
        f"{gap['max_abs_diff']:.2e} (largest |logit| {gap['max_abs_logit']:.2f})"
    )
    if products:
        print(
            f"\nthe {products['n_products']} matrix-vector products of a token alone, 1 thread: "
            f"fp32 {fmt_spread(products['float32'])} µs, bf16 weights "
            f"{fmt_spread(products['bfloat16'])} µs (median (min–max) of alternating rounds)"
        )
    for path, prof in profiles.items():
        print(
            f"\nprofile of {PATHS[path][1]} at 1 thread, per new token ({n_new} tokens, prefill "
            f"and restarts included): {prof['aten_calls_per_token']:.0f} aten calls, "
            f"{prof['self_cpu_us_per_token']:.0f} µs self CPU (profiler overhead included)"
        )
        print(
            table(
                ["op", "calls/token", "self CPU µs/token", "share"],
                [
                    [
                        t["op"],
                        f"{t['calls_per_token']:.1f}",
                        f"{t['self_cpu_us_per_token']:.1f}",
                        f"{100 * t['self_cpu_us_per_token'] / prof['self_cpu_us_per_token']:.1f} %",
                    ]
                    for t in prof["top"]
                ],
            )
        )

    result = {
        "config": {
            "n_params": model.n_params,
            "dims": {
                k: getattr(model.dims, k)
                for k in ("n_layers", "d_model", "n_heads", "d_ff", "context_length", "vocab_size")
            },
            "prompt_tokens": n_prompt,
            "new_tokens": n_new,
            "repeats": repeats,
            "seed": args.seed,
            "quick": args.quick,
            "paths": paths,
        },
        "by_threads": {
            str(t): {k: v for k, v in m.items() if k != "outputs"} for t, m in per_threads.items()
        },
        "targets": {name: [t for t, _ in ts] for name, ts in TARGETS.items()},
        "target_met_median": met,
        "profile_1_thread": profiles,
        "products_alone_us_1_thread": products,
        "identity": {
            "fast_equals_forward": fast_mismatch is None,
            "fast_first_mismatch": fast_mismatch,
            "tokens_checked": n_fit,
            "identical": same,
            "first_mismatch": fit_mismatch,
            "first_mismatch_fast_recompute_over_all_new_tokens": long_mismatch,
            "logit_gap": gap,
        },
    }
    path = write_results("sampling-quick" if args.quick else "sampling", result)
    print(f"wrote {path.relative_to(path.parents[2])}")
    return result


if __name__ == "__main__":
    main()
