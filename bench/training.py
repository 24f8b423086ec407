"""Training speed of the reference configuration: ms/step, tokens/s, MFU, where time goes.

``experiments/baseline.toml`` (4 layers, d_model 256, 4 heads, d_ff 1024, context 256,
batch 16, the char tokenizer's 99 tokens) is loaded with ``load_experiment`` and built
into real :class:`slmkit.train.Trainer` objects (run folders in a temporary directory);
every timed step is the trainer's own ``Stepper.set_lr`` + ``Stepper.step``, so the figures
measure slmkit's code path, not a replica of it. Configurations:

* ``fp32``: ``--set training.precision=fp32`` (the baseline's default ``auto`` is bf16 on
  CPUs with native bf16);
* ``bf16``: ``--set training.precision=bf16`` (autocast; weights stay fp32);
* ``fp32 + compile``, ``bf16 + compile``: the same with ``--set training.compile=true``;
  reported as "unavailable: <reason>" where compiling fails (the trainer then falls back,
  which is detected). Each is paired with its eager configuration round by round.

The configurations are interleaved: each round runs a block of steps of each (rotating
which goes first) and then times the model's own matrix products (see below), so every
ratio and every MFU figure is paired within a round, under the same machine load. Each
trainer keeps its own global-RNG state (swapped in and out around its blocks), so each
draws the random numbers (dropout) it would draw alone; fp32 and bf16 start from the same
seed and take the same number of steps before their validation losses are compared.

MFU (model FLOPs utilisation, nanoGPT / PaLM style)::

    FLOPs per token = 6 * N + 12 * n_layers * context_length * d_model

with N the parameters outside the token and position embedding tables (lookups, not
matrix products; the head's weights count), achieved FLOP/s = FLOPs per token x tokens/s,
divided by the matmul rate measured in the same process with ``torch.matmul`` on the
model's own GEMM shapes (forward, input-gradient and weight-gradient products of qkv,
attention output, MLP and head, and the six attention ``bmm`` shapes), in the same dtype:
"GEMM mix" is the step's mix (each shape weighted as often as a step runs it), "best" the
fastest single shape.

A torch.profiler pass over a few more steps of each configuration (after the validation
losses are taken) labels the phases of the real step (data, forward, backward, finite
check, optimizer, hooks) by wrapping the trainer's own methods with ``record_function``
and prints the ops that take the most time; compiled steps are profiled kernel by kernel
(inductor's ``cpp.enable_kernel_profile``, set for the compiled configurations). From the
eager profiles comes the bound on what compiling can gain (Amdahl): the matrix products
and dropout's random draws run the same kernels compiled or not, so a compiled step is no
faster than their time, however fast it makes everything else.

    uv run python -m bench training [--quick | --smoke] [--device D] [--no-compile]
                                    [--out DIR]

``--smoke``: a tiny model and 2 steps per configuration, no compile (seconds; for tests).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import bench
from bench import ROOT, fmt_spread, machine_line, parse_args, spread, table, write_results

EXPERIMENT = "experiments/baseline.toml"
#: ``--smoke``: a model small enough that a step takes milliseconds (tests/conftest.py's)
SMOKE_OVERRIDES = (
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.context_length=32",
    "training.batch_size=4",
    "training.eval_batches=2",
)
TARGET_BF16_SPEEDUP = 2.0
TARGET_LOSS_GAP = 0.02
#: aten ops that are matrix products (their self time is GEMM time)
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm")
#: fused attention kernels (matrix products and softmax in one op; CUDA, CPU without dropout)
FUSED_ATTENTION = ("flash_attention", "efficient_attention", "cudnn_attention")
#: ops of slmkit's dropout draw (``slmkit::dropout_keep``: ``random_`` bits, ``ge`` threshold)
DRAW_OPS = ("aten::random_", "aten::ge", "slmkit::dropout_keep")
TARGET_COMPILE_SPEEDUP = 1.2
EAGER = ("fp32", "bf16")


# -- shared by bench.training, bench.hooks and bench.checkpoint -----------------------------


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--smoke``, ``--device``, ``--out``."""
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, 1-2 steps: checks the benchmark runs"
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default auto"
    )
    parser.add_argument(
        "--out", default=None, help="folder for <name>.json (default bench/results)"
    )


def save_results(name: str, data: dict[str, Any], out: str | Path | None) -> Path:
    """``bench.write_results``, into ``out`` instead of bench/results when given."""
    if out is None:
        return write_results(name, data)
    saved = bench.RESULTS_DIR
    bench.RESULTS_DIR = Path(out)  # write_results reads the module global
    try:
        return write_results(name, data)
    finally:
        bench.RESULTS_DIR = saved


def result_name(name: str, args: argparse.Namespace) -> str:
    """``name``, ``name-quick`` or ``name-smoke``: short runs never replace full results."""
    return name + ("-smoke" if args.smoke else "-quick" if args.quick else "")


def shown(path: Path) -> str:
    """``path`` relative to the project root where it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def experiment_overrides(args: argparse.Namespace, extra: Sequence[str] = ()) -> list[str]:
    """The overrides every trainer of a benchmark run gets: device, smoke sizes, ``extra``."""
    return [
        f"training.device={args.device}",
        *(SMOKE_OVERRIDES if args.smoke else ()),
        *extra,
    ]


def build_trainer(
    overrides: Sequence[str],
    runs_dir: str | Path,
    *,
    tables: dict[str, Any] | None = None,
    console: Any = None,
) -> Any:
    """A :class:`Trainer` of baseline.toml with ``overrides`` (and extra ``tables``).

    Without ``tables`` the experiment comes from ``load_experiment``; with them (e.g.
    ``{"forward_hooks": [...]}``) the parsed file, overridden, gets them added and goes
    through ``experiment_from_dict``, the same validation.
    """
    from slmkit.config.reading import apply_overrides, read_toml
    from slmkit.config.resolve import experiment_from_dict, load_experiment
    from slmkit.plugins import PluginManager
    from slmkit.progress import Console
    from slmkit.train import Trainer

    manager = PluginManager().load()
    path = ROOT / EXPERIMENT
    if tables:
        data = {**apply_overrides(read_toml(path), overrides), **tables}
        exp = experiment_from_dict(data, manager, source=EXPERIMENT)
    else:
        exp = load_experiment(path, manager, overrides)
    return Trainer(
        exp, manager, EXPERIMENT, runs_dir=runs_dir, console=console or Console(quiet=True)
    )


class Contender:
    """One trainer being timed, step by step, with its own global-RNG state.

    Create it right after building the trainer: the RNG state captured then is the one a
    run would train from. :meth:`steps` swaps it in and out, so contenders interleaved in
    one process draw the same random numbers (dropout) as each would alone.
    """

    def __init__(self, label: str, trainer: Any) -> None:
        from slmkit import checkpoint

        self.label, self.trainer = label, trainer
        self.run = trainer.open_run()  # the real run folder and log.jsonl (in a temp dir)
        trainer.model.train()
        self.rng = checkpoint.rng_state()
        self.times: list[float] = []  # every step timed, warm-up included
        self.cpu_times: list[float] = []  # process CPU seconds of the same steps

    def steps(self, n: int) -> list[float]:
        """Run ``n`` training steps; wall seconds of each (device synchronised).

        Process CPU seconds go to :attr:`cpu_times`: less sensitive to other jobs than wall
        time, though waiting OpenMP workers spin, which counts as CPU time too.
        """
        from slmkit import checkpoint

        t = self.trainer
        checkpoint.set_rng_state(self.rng)
        times = []
        try:
            for _ in range(n):
                step = t.state.step + 1
                log_now = step % t.exp.training.log_every == 0
                cpu, started = time.process_time(), time.perf_counter()
                t.stepper.set_lr(t.state.step)
                t.stepper.step(self.run, step, log_now)
                sync(t.device)
                times.append(time.perf_counter() - started)
                self.cpu_times.append(time.process_time() - cpu)
                t.state.step = step
        finally:
            self.rng = checkpoint.rng_state()
        self.times += times
        return times

    def close(self) -> None:
        """Close the run's log file."""
        self.run.logger.close()


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` rotated left by ``shift`` (ABC, BCA, CAB, ...)."""
    k = shift % len(items) if items else 0
    return [*items[k:], *items[:k]]


# -- FLOPs and the matmul rate ------------------------------------------------------------


def non_embedding_params(model: Any) -> int:
    """Parameters outside the token and position embeddings (the head counts, tied or not)."""
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    if model.head.weight is model.tok_emb.weight:  # tied: the matrix is also the head
        n += model.head.weight.numel()
    return n


def flops_per_token(model: Any) -> tuple[int, str]:
    """``6 N + 12 L T d`` and the formula with the numbers filled in."""
    d = model.dims
    n = non_embedding_params(model)
    attention = 12 * d.n_layers * d.context_length * d.d_model
    text = (
        f"6 * N + 12 * n_layers * context * d_model = 6 * {n:,} + 12 * {d.n_layers} * "
        f"{d.context_length} * {d.d_model} = {6 * n + attention:,} FLOPs/token "
        f"(N = {n:,} parameters outside the two embedding tables)"
    )
    return 6 * n + attention, text


class GemmProbe:
    """The model's own matrix products at one dtype, timed with ``torch.matmul``.

    Shapes for a batch of ``batch`` x ``context`` tokens (M rows): for each linear layer
    (in -> out) the forward ``X W^T``, the input gradient ``dY W`` and the weight gradient
    ``dY^T X``; per layer the six attention products (QK^T, PV and the four of their
    backward) as batched matmuls over batch x heads. Each shape counts as often as a
    training step runs it (block shapes n_layers times, the head once).
    """

    def __init__(self, dims: Any, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        generator = torch.Generator().manual_seed(0)  # never the global RNG

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

        m, d, f, v = batch * dims.context_length, dims.d_model, dims.d_ff, dims.vocab_size
        bh, t, hd = batch * dims.n_heads, dims.context_length, dims.d_model // dims.n_heads
        layers = dims.n_layers
        #: (name, weight, FLOPs of one call, a, b)
        self.cases: list[tuple[str, int, int, torch.Tensor, torch.Tensor]] = []
        for name, k, n, weight in (
            ("attn qkv", d, 3 * d, layers),
            ("attn proj", d, d, layers),
            ("mlp fc", d, f, layers),
            ("mlp proj", f, d, layers),
            ("head", d, v, 1),
        ):
            w, x, dy = rand(n, k), rand(m, k), rand(m, n)
            flops = 2 * m * k * n
            self.cases += [
                (f"{name} fwd ({m}x{k} @ {k}x{n})", weight, flops, x, w.t()),
                (f"{name} dX ({m}x{n} @ {n}x{k})", weight, flops, dy, w),
                (f"{name} dW ({n}x{m} @ {m}x{k})", weight, flops, dy.t(), x),
            ]
        q, k_, p = rand(bh, t, hd), rand(bh, t, hd), rand(bh, t, t)
        flops = 2 * bh * t * t * hd
        bmm = f"[{bh}] "
        self.cases += [
            (f"attn QK^T {bmm}{t}x{hd} @ {hd}x{t}", layers, flops, q, k_.transpose(1, 2)),
            (f"attn PV {bmm}{t}x{t} @ {t}x{hd}", layers, flops, p, k_),
            (f"attn dP {bmm}{t}x{hd} @ {hd}x{t}", layers, flops, q, k_.transpose(1, 2)),
            (f"attn dV {bmm}{t}x{t}^T @ {t}x{hd}", layers, flops, p.transpose(1, 2), q),
            (f"attn dQ {bmm}{t}x{t} @ {t}x{hd}", layers, flops, p, k_),
            (f"attn dK {bmm}{t}x{t}^T @ {t}x{hd}", layers, flops, p.transpose(1, 2), q),
        ]
        self.reps = 20 if device.type == "cuda" else 2
        self.seconds: dict[str, list[float]] = {c[0]: [] for c in self.cases}
        self.mix_rates: list[float] = []
        self.measure(record=False)  # warm-up: allocator, kernel choice

    def measure(self, record: bool = True) -> float:
        """Time every shape once (``reps`` calls each); the GEMM-mix FLOP/s of this pass."""
        flops = seconds = 0.0
        for name, weight, f, a, b in self.cases:
            sync(self.device)
            started = time.perf_counter()
            for _ in range(self.reps):
                torch.matmul(a, b)
            sync(self.device)
            per_call = (time.perf_counter() - started) / self.reps
            flops += weight * f
            seconds += weight * per_call
            if record:
                self.seconds[name].append(per_call)
        rate = flops / seconds
        if record:
            self.mix_rates.append(rate)
        return rate

    def shape_rates(self) -> dict[str, dict[str, float]]:
        """GFLOP/s of each shape, median (min–max) over the passes."""
        return {
            name: spread([f / s / 1e9 for s in self.seconds[name]])
            for name, _w, f, _a, _b in self.cases
        }


# -- the profiler pass --------------------------------------------------------------------


@contextlib.contextmanager
def labelled_phases(trainer: Any) -> Iterator[None]:
    """Wrap the trainer's own step pieces in ``record_function`` labels ``slmkit::*``.

    Instance attributes shadow the methods (removed afterwards); ``Tensor.backward`` is
    wrapped for the duration. On CUDA each piece synchronises, so its CPU time covers
    its kernels.
    """
    from torch.profiler import record_function

    device = trainer.device

    def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            with record_function(label):
                out = fn(*args, **kwargs)
                sync(device)
            return out

        return wrapped

    patched: list[tuple[Any, str]] = []

    def patch(obj: Any, attr: str, label: str) -> None:
        setattr(obj, attr, wrap(getattr(obj, attr), label))
        patched.append((obj, attr))

    patch(trainer.data.stream, "next_batch", "slmkit::data")
    patch(trainer.stepper, "_forward", "slmkit::forward")
    patch(trainer.stepper, "_finite", "slmkit::finite_check")
    patch(trainer.optimizer, "step", "slmkit::optimizer")
    patch(trainer.optimizer, "zero_grad", "slmkit::optimizer")
    if trainer.forward_hooks is not None:
        patch(trainer.forward_hooks, "begin", "slmkit::hooks")
        patch(trainer.forward_hooks, "end", "slmkit::hooks")
    if trainer.update_hooks is not None:
        patch(trainer.update_hooks, "apply", "slmkit::hooks")
    backward = torch.Tensor.backward
    torch.Tensor.backward = wrap(backward, "slmkit::backward")  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.backward = backward  # type: ignore[method-assign]
        for obj, attr in patched:
            with contextlib.suppress(AttributeError):
                delattr(obj, attr)


PHASES = ("data", "forward", "backward", "finite_check", "optimizer", "hooks")


def profile_steps(contender: Contender, n_steps: int, top: int = 15) -> dict[str, Any]:
    """Profile ``n_steps`` real steps: per-phase ms/step and the heaviest ops."""
    from torch.profiler import ProfilerActivity, profile, record_function

    device = contender.trainer.device
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    wall = []
    with labelled_phases(contender.trainer), profile(activities=activities) as prof:
        for _ in range(n_steps):
            started = time.perf_counter()
            with record_function("slmkit::step"):
                contender.steps(1)
            wall.append(time.perf_counter() - started)
    averages = prof.key_averages()
    by_key = {e.key: e for e in averages}

    def ms(key: str) -> float:
        event = by_key.get(key)
        return event.cpu_time_total / 1e3 / n_steps if event is not None else 0.0

    step_ms = ms("slmkit::step")
    phases = {p: ms(f"slmkit::{p}") for p in PHASES}
    phases["other (lr, .to(device), bookkeeping)"] = max(0.0, step_ms - sum(phases.values()))
    ops = [
        e
        for e in averages
        if (e.key in DRAW_OPS or not e.key.startswith(("slmkit::", "Optimizer.", "ProfilerStep")))
        and e.self_cpu_time_total > 0
    ]
    on_device = device.type == "cuda"

    def self_time(e: Any) -> float:
        return getattr(e, "self_device_time_total", 0.0) if on_device else e.self_cpu_time_total

    total_self = sum(self_time(e) for e in ops) or 1.0
    ops.sort(key=self_time, reverse=True)
    top_ops = [
        {
            "op": e.key,
            "calls_per_step": e.count / n_steps,
            "self_ms_per_step": self_time(e) / 1e3 / n_steps,
            "share": self_time(e) / total_self,
        }
        for e in ops[:top]
    ]
    gemm = sum(self_time(e) for e in ops if e.key in GEMM_OPS)
    draws = sum(self_time(e) for e in ops if e.key in DRAW_OPS)
    fused = sum(self_time(e) for e in ops if any(k in e.key for k in FUSED_ATTENTION))
    return {
        "steps": n_steps,
        "time_base": "device (CUDA kernel) time" if on_device else "CPU time",
        "step_ms_profiled": step_ms,
        "wall_ms_per_step_profiled": spread([1e3 * s for s in wall]),
        "phases_ms_per_step": phases,
        "top_ops": top_ops,
        "gemm_share_of_op_time": gemm / total_self,
        "dropout_draw_share_of_op_time": draws / total_self,
        "fused_attention_share_of_op_time": fused / total_self,
        "op_time_ms_per_step": total_self / 1e3 / n_steps,
    }


# -- the benchmark ------------------------------------------------------------------------


def schedule(args: argparse.Namespace) -> dict[str, int]:
    """Warm-up steps, rounds, steps per block, profiled steps (all configurations each round)."""
    if args.smoke:
        plan = {"warmup": 1, "rounds": 1, "block": 1, "profile": 1}
    elif args.quick:
        plan = {"warmup": 2, "rounds": 3, "block": 3, "profile": 2}
    else:
        plan = {"warmup": 4, "rounds": 16, "block": 6, "profile": 5}
    for key in ("warmup", "rounds", "block"):
        if getattr(args, key, None):
            plan[key] = getattr(args, key)
    return plan


def try_compile(
    label: str, overrides: list[str], runs_dir: str, warmup: int
) -> tuple[Contender | None, dict[str, Any]]:
    """A compiled contender warmed up, or None and why compiling is unavailable."""
    import torch._inductor.config as inductor_config

    from slmkit.progress import Console

    # each generated kernel as a record_function range, so the profile shows where the
    # compiled step's time goes (one range per kernel call: microseconds of a step)
    inductor_config.cpp.enable_kernel_profile = True
    said = io.StringIO()
    contender = None
    try:
        trainer = build_trainer(
            [*overrides, "training.compile=true"], runs_dir, console=Console(said)
        )
        contender = Contender(label, trainer)
        first = contender.steps(1)[0]  # compiles forward and backward
        if trainer.stepper.compiled is None:  # the trainer fell back to eager
            message = said.getvalue().strip().splitlines() or ["the trainer fell back"]
            raise RuntimeError(message[-1].removeprefix("warning: "))
        contender.steps(max(0, warmup - 1))
        return contender, {"first_step_s": first}
    except Exception as exc:  # no C++ compiler, no triton, unsupported op...
        if contender is not None:
            contender.close()
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return None, {"unavailable": f"{type(exc).__name__}: {lines[0][:200]}"}


def amdahl_bound(profile: dict[str, dict[str, Any]], dtype: str) -> dict[str, float]:
    """The most compiling can gain: eager op time over that of what it leaves as it is.

    Matrix products run the same library kernels compiled or not, and dropout's draws are
    one opaque operator (the same bits as eager); the rest (element-wise, norms, softmax,
    casts) is what inductor fuses: its ms/step eager and, where profiled, compiled.
    """
    eager = profile[dtype]
    gemm, draws = eager["gemm_share_of_op_time"], eager["dropout_draw_share_of_op_time"]
    out = {
        "gemm_share": gemm,
        "draw_share": draws,
        "bound": 1 / (gemm + draws),
        "rest_ms": eager["op_time_ms_per_step"] * (1 - gemm - draws),
    }
    compiled = profile.get(f"{dtype} + compile")
    if compiled is not None:
        fixed = compiled["gemm_share_of_op_time"] + compiled["dropout_draw_share_of_op_time"]
        out["compiled_rest_ms"] = compiled["op_time_ms_per_step"] * (1 - fixed)
    return out


def evaluate_all(trainer: Any) -> dict[str, float]:
    """Validation loss as the trainer logs it (under its autocast) and in plain fp32."""
    from slmkit.evaluate import evaluate

    with trainer.stepper.precision.autocast():
        logged = evaluate(trainer.model, trainer.data.val_batches, trainer.device)
    out = {"val_loss": logged}
    if trainer.stepper.precision.dtype is not None:
        batches = trainer.data.val_batches
        out["val_loss_fp32_eval"] = evaluate(trainer.model, batches, trainer.device)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, write ``<out>/training[-quick|-smoke].json``."""
    parser = argparse.ArgumentParser(prog="bench.training", description=__doc__.split("\n")[0])
    add_common_options(parser)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time fp32 and bf16 + torch.compile too (default: yes, except with --smoke)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per config")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--block", type=int, default=None, help="steps per config per round")
    args = parse_args(parser, argv)
    plan = schedule(args)
    with_compile = (not args.smoke) if args.compile is None else args.compile
    overrides = experiment_overrides(args)
    if not args.smoke and args.quick:
        overrides.append("training.eval_batches=4")
    trained_steps = plan["warmup"] + plan["rounds"] * plan["block"]

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="slmkit-bench-training-") as runs_dir:
        contenders = [
            Contender(label, build_trainer([*overrides, f"training.precision={label}"], runs_dir))
            for label in EAGER
        ]
        fp32 = contenders[0].trainer
        model, device, t = fp32.model, fp32.device, fp32.exp.training
        tokens_per_step = t.batch_size * t.grad_accum_steps * model.dims.context_length
        per_token, formula = flops_per_token(model)
        print(f"{EXPERIMENT} " + " ".join(f"--set {o}" for o in overrides) + f"; device {device}")
        print(
            f"model: {model.n_params:,} parameters; {tokens_per_step:,} tokens/step "
            f"({t.batch_size} x {model.dims.context_length}); {plan['warmup']} warm-up steps, "
            f"then {plan['rounds']} interleaved round(s) of {plan['block']} step(s) per "
            f"configuration"
        )
        print(f"model FLOPs/token: {formula}")
        probes = {
            "fp32": GemmProbe(model.dims, t.batch_size, device, torch.float32),
            "bf16": GemmProbe(model.dims, t.batch_size, device, torch.bfloat16),
        }
        for c in contenders:
            c.steps(plan["warmup"])
        compiled: list[Contender] = []
        compile_info: dict[str, dict[str, Any]] = {}
        for dtype in EAGER:
            label = f"{dtype} + compile"
            if not with_compile:
                compile_info[label] = {"unavailable": "not requested (--no-compile)"}
                continue
            print(f"compiling ({label})...", flush=True)
            contender, compile_info[label] = try_compile(
                label, [*overrides, f"training.precision={dtype}"], runs_dir, plan["warmup"]
            )
            if contender is None:
                print(f"torch.compile ({label}) {compile_info[label]['unavailable']}")
            else:
                compiled.append(contender)
        # rounds: a block of each configuration (rotating the order), then the GEMM probes
        blocks: dict[str, list[float]] = {}  # label -> wall seconds of every timed step
        cpu_blocks: dict[str, list[float]] = {}  # label -> CPU seconds of the same steps
        per_round: dict[str, list[float]] = {}  # label -> median wall seconds in each round
        per_round_cpu: dict[str, list[float]] = {}
        gemm_round: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for r in range(plan["rounds"]):
            for c in rotated([*contenders, *compiled], r):
                times = c.steps(plan["block"])
                cpu = c.cpu_times[-len(times) :]
                per_round.setdefault(c.label, []).append(statistics.median(times))
                per_round_cpu.setdefault(c.label, []).append(statistics.median(cpu))
                blocks.setdefault(c.label, []).extend(times)
                cpu_blocks.setdefault(c.label, []).extend(cpu)
            for dtype in rotated(list(probes), r):
                gemm_round[dtype].append(probes[dtype].measure())
            print(f"round {r + 1}/{plan['rounds']} done", flush=True)

        val = {c.label: evaluate_all(c.trainer) for c in contenders}
        profiled = contenders[:1] if args.smoke else [*contenders, *compiled]  # smoke: fp32
        profile = {c.label: profile_steps(c, plan["profile"]) for c in profiled}
        for c in [*contenders, *compiled]:
            c.close()

    # -- figures -------------------------------------------------------------------------
    dtype_of = {label: label.split(" ")[0] for label in (*EAGER, *compile_info)}
    results: dict[str, dict[str, Any]] = {}
    for label, times in blocks.items():
        rounds = per_round[label]
        gemm = gemm_round[dtype_of[label]][: len(rounds)]
        achieved = [per_token * tokens_per_step / s for s in rounds]
        best_shape = max(v["median"] for v in probes[dtype_of[label]].shape_rates().values())
        results[label] = {
            "steps_timed": len(times),
            "ms_per_step": spread([1e3 * s for s in times]),
            "cpu_ms_per_step": spread([1e3 * s for s in cpu_blocks[label]]),
            "tokens_per_s": spread([tokens_per_step / s for s in times]),
            "achieved_gflops": spread([a / 1e9 for a in achieved]),
            "mfu_vs_gemm_mix": spread([a / g for a, g in zip(achieved, gemm, strict=True)]),
            "mfu_vs_best_gemm": spread([a / (best_shape * 1e9) for a in achieved]),
            "ms_per_step_all": [1e3 * s for s in times],
        }
    for label, info in compile_info.items():
        results.setdefault(label, {}).update(info)

    def paired(a: str, b: str) -> dict[str, Any] | None:
        """tokens/s of ``a`` over ``b``, per round (step-time ratio of the same round)."""
        if a not in per_round or b not in per_round:
            return None
        ratios = [tb / ta for ta, tb in zip(per_round[a], per_round[b], strict=False)]
        cpu = [tb / ta for ta, tb in zip(per_round_cpu[a], per_round_cpu[b], strict=False)]
        of_medians = results[a]["tokens_per_s"]["median"] / results[b]["tokens_per_s"]["median"]
        return {
            **spread(ratios),
            "ratio_of_medians": of_medians,
            "cpu_time": spread(cpu),
            "rounds": len(ratios),
        }

    bf16_ratio = paired("bf16", "fp32")
    compile_ratio = {dtype: paired(f"{dtype} + compile", dtype) for dtype in EAGER}
    compile_bound = {d: amdahl_bound(profile, d) for d in EAGER if d in profile}
    gemm = {
        dtype: {
            "mix_gflops": spread([r / 1e9 for r in gemm_round[dtype]]),
            "shapes_gflops": probe.shape_rates(),
            "calls_per_pass": probe.reps,
        }
        for dtype, probe in probes.items()
    }
    loss_gap = val["bf16"]["val_loss"] - val["fp32"]["val_loss"]

    # -- tables --------------------------------------------------------------------------
    ms_fmt = "{:.0f}" if device.type == "cpu" else "{:.2f}"
    rows = []
    for label in (*EAGER, *compile_info):
        r = results[label]
        if "unavailable" in r:
            rows.append([label, f"unavailable: {r['unavailable']}", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                label,
                r["steps_timed"],
                fmt_spread(r["ms_per_step"], ms_fmt),
                fmt_spread(r["cpu_ms_per_step"], ms_fmt),
                fmt_spread(r["tokens_per_s"], "{:.0f}"),
                fmt_spread(r["achieved_gflops"], "{:.1f}"),
                fmt_spread({k: 100 * v for k, v in r["mfu_vs_gemm_mix"].items()}) + " %",
                fmt_spread({k: 100 * v for k, v in r["mfu_vs_best_gemm"].items()}) + " %",
            ]
        )
    print()
    print(
        table(
            [
                "config",
                "steps timed",
                "ms/step",
                "CPU ms/step",
                "tokens/s",
                "model GFLOP/s",
                "MFU vs GEMM mix",
                "MFU vs best GEMM",
            ],
            rows,
        )
    )
    print(
        "(median (min–max) over timed steps; CPU ms: process CPU time, all threads; GFLOP/s "
        "and MFU per round, paired with that round's GEMM probe of the same dtype)"
    )
    for label, info in compile_info.items():
        if "first_step_s" in info:
            print(f"{label}: first step (compiling) {info['first_step_s']:.1f} s")
    print()
    peak_rows = []
    for dtype, g in gemm.items():
        best_name = max(g["shapes_gflops"], key=lambda k: g["shapes_gflops"][k]["median"])
        peak_rows.append(
            [
                dtype,
                fmt_spread(g["mix_gflops"]),
                fmt_spread(g["shapes_gflops"][best_name]),
                best_name,
            ]
        )
    print(table(["dtype", "GEMM-mix GFLOP/s", "best shape GFLOP/s", "best shape"], peak_rows))
    print()
    print(
        table(
            ["GEMM shape (torch.matmul)", "weight/step", "fp32 GFLOP/s", "bf16 GFLOP/s"],
            [
                [
                    name,
                    weight,
                    fmt_spread(gemm["fp32"]["shapes_gflops"][name]),
                    fmt_spread(gemm["bf16"]["shapes_gflops"][name]),
                ]
                for name, weight, *_ in probes["fp32"].cases
            ],
        )
    )
    print()
    if bf16_ratio:
        met = bf16_ratio["median"] >= TARGET_BF16_SPEEDUP
        print(
            f"bf16 / fp32 tokens/s: {fmt_spread(bf16_ratio, '{:.2f}')}x paired per round "
            f"({bf16_ratio['ratio_of_medians']:.2f}x ratio of medians; CPU time "
            f"{fmt_spread(bf16_ratio['cpu_time'], '{:.2f}')}x); target >= "
            f"{TARGET_BF16_SPEEDUP:.0f}x: {'met' if met else 'NOT met'}"
        )
    for dtype, ratio in compile_ratio.items():
        if ratio is None:
            continue
        met = ratio["median"] >= TARGET_COMPILE_SPEEDUP
        print(
            f"{dtype} + compile / {dtype} tokens/s: {fmt_spread(ratio, '{:.2f}')}x paired "
            f"over {ratio['rounds']} round(s) ({ratio['ratio_of_medians']:.2f}x ratio of "
            f"medians; CPU time {fmt_spread(ratio['cpu_time'], '{:.2f}')}x); target >= "
            f"{TARGET_COMPILE_SPEEDUP}x: {'met' if met else 'NOT met'}"
        )
    for dtype, bound in compile_bound.items():
        print(
            f"{dtype} eager step: matrix products {100 * bound['gemm_share']:.1f} % and "
            f"dropout draws {100 * bound['draw_share']:.1f} % of op time, which compiling "
            f"leaves as they are: at most {bound['bound']:.2f}x however fast the rest "
            f"({bound['rest_ms']:.0f} ms/step eager"
            + (f", {bound['compiled_rest_ms']:.0f} compiled)" if "compiled_rest_ms" in bound
               else ")")
        )  # fmt: skip
    print()
    val_rows = [
        ["fp32", f"{val['fp32']['val_loss']:.4f}", "-"],
        ["bf16 (autocast eval, as logged)", f"{val['bf16']['val_loss']:.4f}", f"{loss_gap:+.4f}"],
        [
            "bf16 (same weights, fp32 eval)",
            f"{val['bf16']['val_loss_fp32_eval']:.4f}",
            f"{val['bf16']['val_loss_fp32_eval'] - val['fp32']['val_loss']:+.4f}",
        ],
    ]
    n_val = sum(y.numel() for _, y in fp32.data.val_batches)
    print(
        table(
            [
                f"val loss after {trained_steps} steps (seed {fp32.exp.experiment.seed})",
                "nats/token",
                "vs fp32",
            ],
            val_rows,
        )
    )
    gap_met = abs(loss_gap) <= TARGET_LOSS_GAP
    print(
        f"({n_val:,} validation tokens; target |bf16 - fp32| <= {TARGET_LOSS_GAP} nats: "
        f"{'met' if gap_met else 'NOT met'})"
    )
    print()
    phase_rows = []
    for name in profile["fp32"]["phases_ms_per_step"]:
        row = [name]
        for p in profile.values():
            v = p["phases_ms_per_step"][name]
            row += [f"{v:.1f}", f"{100 * v / (p['step_ms_profiled'] or 1.0):.1f}"]
        phase_rows.append(row)
    phase_rows.append(
        [
            "step (profiled)",
            *(x for p in profile.values() for x in (f"{p['step_ms_profiled']:.1f}", "100.0")),
        ]
    )
    print(
        table(
            [
                f"step phase ({profile['fp32']['steps']} profiled steps each)",
                *(h for label in profile for h in (f"{label} ms/step", f"{label} %")),
            ],
            phase_rows,
        )
    )
    for label, p in profile.items():
        print(
            f"({label}: wall ms/step under the profiler "
            f"{fmt_spread(p['wall_ms_per_step_profiled'])}, unprofiled "
            f"{fmt_spread(results[label]['ms_per_step'])})"
        )
    for label, p in profile.items():
        print()
        print(
            table(
                [
                    f"op ({label} step)",
                    "calls/step",
                    f"self ms/step ({p['time_base']})",
                    "% of ops",
                ],
                [
                    [
                        o["op"],
                        f"{o['calls_per_step']:.0f}",
                        f"{o['self_ms_per_step']:.1f}",
                        f"{100 * o['share']:.1f}",
                    ]
                    for o in p["top_ops"]
                ],
            )
        )
        fused = p["fused_attention_share_of_op_time"]
        print(
            f"{label}: GEMM ops ({', '.join(GEMM_OPS)}) {100 * p['gemm_share_of_op_time']:.1f} % "
            f"of op time ({p['op_time_ms_per_step']:.0f} ms/step in ops)"
            + (f", fused attention kernels {100 * fused:.1f} %" if fused else "")
        )
    if args.smoke:
        print("(smoke run: tiny model, figures not meaningful)")

    result = {
        "experiment": EXPERIMENT,
        "config": {
            "overrides": overrides,
            "device": str(device),
            "n_params": model.n_params,
            "non_embedding_params": non_embedding_params(model),
            "dims": {
                k: getattr(model.dims, k)
                for k in ("n_layers", "d_model", "n_heads", "d_ff", "context_length", "vocab_size")
            },
            "batch_size": t.batch_size,
            "tokens_per_step": tokens_per_step,
            "flops_per_token": per_token,
            "flops_formula": formula,
            "plan": plan,
            "trained_steps": trained_steps,
            "quick": args.quick,
            "smoke": args.smoke,
        },
        "configs": results,
        "bf16_over_fp32_tokens_per_s": bf16_ratio,
        "compile_over_eager_tokens_per_s": compile_ratio,
        "compile_bound": compile_bound,
        "gemm": gemm,
        "val_loss": {
            "steps": trained_steps,
            "tokens": n_val,
            "fp32": val["fp32"]["val_loss"],
            "bf16": val["bf16"]["val_loss"],
            "bf16_fp32_eval": val["bf16"]["val_loss_fp32_eval"],
            "bf16_minus_fp32": loss_gap,
        },
        "profile": profile,
        "targets": {
            "bf16_speedup": TARGET_BF16_SPEEDUP,
            "bf16_speedup_met": bool(bf16_ratio and bf16_ratio["median"] >= TARGET_BF16_SPEEDUP),
            "val_loss_gap": TARGET_LOSS_GAP,
            "val_loss_gap_met": gap_met,
            "compile_speedup": TARGET_COMPILE_SPEEDUP,
            "compile_speedup_met": {
                dtype: bool(ratio and ratio["median"] >= TARGET_COMPILE_SPEEDUP)
                for dtype, ratio in compile_ratio.items()
            },
        },
    }
    path = save_results(result_name("training", args), result, args.out)
    print(f"wrote {shown(path)}")
    return result


if __name__ == "__main__":
    main()
