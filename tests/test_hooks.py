"""Hook points, forward hooks and update hooks: shapes, exact metrics, no side effects."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_parameters, events, losses, train
from slmkit_builtin.forward_hooks import (
    ActivationStats,
    ActivationStatsOptions,
    AttentionEntropy,
)
from slmkit_builtin.gpt import GPTBlock, GPTOptions
from slmkit_builtin.update_hooks import (
    ClipGradNorm,
    ClipOptions,
    GradNoise,
    GradStats,
    Grokfast,
    GrokfastOptions,
    NoiseOptions,
)
from torch import nn

import slmkit
from slmkit import checkpoint
from slmkit.components import ModelDims
from slmkit.config.resolve import load_experiment
from slmkit.errors import ConfigError, HookFailure, RunError
from slmkit.hookpoint import HookPoint
from slmkit.hooks import EnabledHook, ForwardHooks, UpdateHooks, select_points, to_plain
from slmkit.model import LanguageModel
from slmkit.param_groups import parameter_layer
from slmkit.plugins import PluginManager
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.train import Trainer

BUILTIN_UPDATE = "slmkit_builtin.update_hooks"

#: the hook points of one gpt block, in the order a forward pass reaches them
BLOCK_POINTS_RUN_ORDER = (
    "hook_resid_pre",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_pattern",
    "attn.hook_out",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_resid_post",
)
#: ``model.hook_points`` follows module order, which the gpt block keeps equal to it
BLOCK_POINTS_MODULE_ORDER = BLOCK_POINTS_RUN_ORDER


def expected_points(order: tuple[str, ...], n_layers: int = 2) -> list[str]:
    blocks = [f"blocks.{i}.{p}" for i in range(n_layers) for p in order]
    return ["hook_embed", *blocks, "ln_f.hook_normalized"]


# -- helpers: tiny models ------------------------------------------------------------------

DIMS = dict(n_layers=2, d_model=16, n_heads=2, d_ff=24, context_length=8, vocab_size=11)


def tiny_model(attention: str = "sdpa", dropout: float = 0.0, seed: int = 0) -> LanguageModel:
    dims = ModelDims(dropout=dropout, **DIMS)
    options = GPTOptions(attention=attention)
    torch.manual_seed(seed)
    return LanguageModel(dims, lambda layer: GPTBlock(options, dims, layer))


def tokens(batch: int = 3, time: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, DIMS["vocab_size"], (batch, time), generator=g)


def record_all(model: LanguageModel) -> list[tuple[str, torch.Tensor]]:
    """Attach an observer to every point; it appends ``(name, activation)`` as they pass."""
    seen: list[tuple[str, torch.Tensor]] = []
    for point in model.hook_points.values():
        point.observers.append(lambda name, x: seen.append((name, x.clone())))
    return seen


def detach_all(model: LanguageModel) -> None:
    for point in model.hook_points.values():
        point.observers.clear()


# -- helpers: runs -------------------------------------------------------------------------


def update_hook(hook: Any, name: str) -> EnabledHook:
    return EnabledHook("update_hook", name, BUILTIN_UPDATE, hook)


# == 1. hook points ========================================================================


def test_hook_point_names_are_the_documented_list() -> None:
    model = tiny_model()
    assert list(model.hook_points) == expected_points(BLOCK_POINTS_MODULE_ORDER)
    assert all(point.name == name for name, point in model.hook_points.items())
    assert all(isinstance(p, HookPoint) for p in model.hook_points.values())
    # a forward pass reaches them in the documented order, each exactly once
    seen = record_all(model)
    model.eval()
    model(tokens())
    assert [name for name, _ in seen] == expected_points(BLOCK_POINTS_RUN_ORDER)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_hook_point_shapes(attention: str) -> None:
    model = tiny_model(attention).eval()
    batch, time = 3, 7
    d, h, d_ff = DIMS["d_model"], 2, DIMS["d_ff"]
    recorded = record_all(model)
    model(tokens(batch, time))
    seen = dict(recorded)
    shapes = {name: tuple(x.shape) for name, x in seen.items()}
    expected = {"hook_embed": (batch, time, d), "ln_f.hook_normalized": (batch, time, d)}
    for i in range(2):
        b = f"blocks.{i}"
        expected |= {
            f"{b}.hook_resid_pre": (batch, time, d),
            f"{b}.hook_resid_post": (batch, time, d),
            f"{b}.attn.hook_q": (batch, h, time, d // h),
            f"{b}.attn.hook_k": (batch, h, time, d // h),
            f"{b}.attn.hook_v": (batch, h, time, d // h),
            f"{b}.attn.hook_pattern": (batch, h, time, time),
            f"{b}.attn.hook_out": (batch, time, d),
            f"{b}.mlp.hook_pre": (batch, time, d_ff),
            f"{b}.mlp.hook_post": (batch, time, d_ff),
        }
    assert shapes == expected
    for i in range(2):
        pattern = seen[f"blocks.{i}.attn.hook_pattern"]
        assert torch.allclose(pattern.sum(dim=-1), torch.ones(batch, h, time))
        above = torch.ones(time, time, dtype=torch.bool).triu(diagonal=1)
        assert torch.all(pattern[..., above] == 0)  # causal: exact zeros above the diagonal
        assert torch.all(pattern[..., ~above] > 0)
    # the observers get detached tensors; mlp.hook_post is gelu(mlp.hook_pre)
    assert not any(x.requires_grad for x in seen.values())
    for i in range(2):
        pre, post = seen[f"blocks.{i}.mlp.hook_pre"], seen[f"blocks.{i}.mlp.hook_post"]
        assert torch.equal(post, torch.nn.functional.gelu(pre))


def test_hook_point_with_no_observer_returns_its_input_itself() -> None:
    point = HookPoint()
    x = torch.randn(2, 3, requires_grad=True)
    assert not point.active
    assert point(x) is x
    seen: list[tuple[str, torch.Tensor]] = []
    point.name = "somewhere"
    point.observers.append(lambda name, a: seen.append((name, a)))
    assert point.active
    assert point(x) is x  # still the same object: what observers return is discarded
    ((name, observed),) = seen
    assert name == "somewhere"
    assert not observed.requires_grad and observed.data_ptr() == x.data_ptr()
    assert point.forward(x) is x


def test_watching_changes_no_output_in_eval_mode() -> None:
    model = tiny_model("sdpa").eval()
    x = tokens()
    plain, _ = model(x)
    seen = record_all(model)
    watched, _ = model(x)
    assert len(seen) == len(model.hook_points)
    assert torch.equal(plain, watched)
    detach_all(model)
    again, _ = model(x)
    assert torch.equal(plain, again)


def test_watching_changes_no_output_in_train_mode_with_dropout() -> None:
    model = tiny_model("sdpa", dropout=0.1).train()
    x = tokens()
    y = tokens(seed=2)
    torch.manual_seed(123)
    plain, plain_loss = model(x, y)
    seen = record_all(model)
    torch.manual_seed(123)
    watched, watched_loss = model(x, y)
    assert {name for name, _ in seen} == set(model.hook_points)
    assert torch.equal(plain, watched)
    assert torch.equal(plain_loss, watched_loss)
    # and the gradients are the same as well
    detach_all(model)
    grads = []
    for watch in (False, True):
        if watch:
            record_all(model)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        model(x, y)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        detach_all(model)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    # dropout is really on: another seed gives other logits
    torch.manual_seed(124)
    other, _ = model(x, y)
    assert not torch.equal(plain, other)


def test_sdpa_pattern_equals_explicit_pattern() -> None:
    fused = tiny_model("sdpa").eval()
    explicit = tiny_model("explicit").eval()
    explicit.load_state_dict(fused.state_dict())
    x = tokens()
    patterns = []
    for model in (fused, explicit):
        seen = record_all(model)
        model(x)
        patterns.append({k: v for k, v in seen if k.endswith("hook_pattern")})
    assert patterns[0].keys() == patterns[1].keys() == {
        "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern",
    }  # fmt: skip
    for name in patterns[0]:
        assert torch.allclose(patterns[0][name], patterns[1][name], atol=1e-6)
    detach_all(fused)
    detach_all(explicit)
    assert torch.allclose(fused(x)[0], explicit(x)[0], atol=1e-5)


def test_select_points_globs() -> None:
    names = list(tiny_model().hook_points)
    selected = select_points(
        names,
        ["blocks.*.hook_resid_post", "*hook_q", "ln_f.hook_normalized", "hook_embed",
         "blocks.*.hook_q", "blocks.1.*", "blocks.*.hook_nope"],
    )  # fmt: skip
    assert selected == {
        "blocks.*.hook_resid_post": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
        "*hook_q": ["blocks.0.attn.hook_q", "blocks.1.attn.hook_q"],
        "ln_f.hook_normalized": ["ln_f.hook_normalized"],
        "hook_embed": ["hook_embed"],
        # "*" matches across dots
        "blocks.*.hook_q": ["blocks.0.attn.hook_q", "blocks.1.attn.hook_q"],
        "blocks.1.*": [n for n in names if n.startswith("blocks.1.")],
        "blocks.*.hook_nope": [],
    }
    assert len(selected["blocks.1.*"]) == 9
    # matching is case-sensitive and anchored
    assert select_points(names, ["HOOK_EMBED", "embed", "hook_embed*"]) == {
        "HOOK_EMBED": [], "embed": [], "hook_embed*": ["hook_embed"],
    }  # fmt: skip


def test_parameter_layer_and_to_plain() -> None:
    assert parameter_layer("blocks.2.attn.qkv.weight") == "blocks.2"
    assert parameter_layer("blocks.0.ln_1.bias") == "blocks.0"
    assert parameter_layer("tok_emb.weight") == "tok_emb"
    assert parameter_layer("ln_f.weight") == "ln_f"
    assert parameter_layer("head.weight") == "head"
    value = {"a": torch.tensor(1.5), "b": [torch.tensor([1.0, 2.0]), (torch.tensor(3),)], "c": "x"}
    plain = to_plain(value)
    assert plain == {"a": 1.5, "b": [[1.0, 2.0], [3]], "c": "x"}
    assert type(plain["a"]) is float and type(plain["b"][1][0]) is int


def test_forward_hooks_attach_per_phase_and_every_and_detach() -> None:
    model = tiny_model().eval()
    stats = EnabledHook("forward_hook", "activation_stats", "p",
                        ActivationStats(ActivationStatsOptions()), every=2)  # fmt: skip
    stats.points = ["hook_embed"]
    hooks = ForwardHooks([stats], model.hook_points)
    assert hooks.begin("train", 1) == []
    assert hooks.begin("eval", 2) == []  # activation_stats watches only training passes
    assert hooks.begin("train", 2) == [stats]
    assert [n for n, p in model.hook_points.items() if p.active] == ["hook_embed"]
    model(tokens())
    ((entry, metrics),) = hooks.end("train", 2, [stats])
    assert entry is stats and list(metrics) == ["hook_embed"]
    assert not any(p.active for p in model.hook_points.values())


# == 2. forward hooks cannot change outputs, end to end ====================================

OBSERVING_TABLES = {
    "forward_hooks": [
        {"name": "activation_stats", "every": 1},
        {"name": "attention_entropy", "every": 2},
        {"name": "capture"},
    ],
    "update_hooks": [{"name": "grad_stats"}],
}
RUN_CHANGES = {"model": {"context_length": 16}, "training": {"max_steps": 6}}


def disabled(tables: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {k: [{**t, "enabled": False} for t in v] for k, v in tables.items()}


def test_forward_hooks_change_nothing_end_to_end(write_experiment, manager, tmp_path) -> None:
    plain_path = write_experiment(RUN_CHANGES, name="plain.toml")
    hooked_path = write_experiment({**RUN_CHANGES, **OBSERVING_TABLES}, name="hooked.toml")
    off_path = write_experiment({**RUN_CHANGES, **disabled(OBSERVING_TABLES)}, name="off.toml")
    plain = train(plain_path, tmp_path / "plain", manager)
    hooked = train(hooked_path, tmp_path / "hooked", manager)
    off = train(off_path, tmp_path / "off", manager)

    assert [s for s, _ in losses(plain)] == [1, 2, 3, 4, 5, 6]
    assert losses(hooked) == losses(plain)
    assert losses(off) == losses(plain)
    assert_same_parameters(hooked, plain)
    assert_same_parameters(off, plain)
    val = [e["val_loss"] for e in events(plain, "eval")]
    assert [e["val_loss"] for e in events(hooked, "eval")] == val
    assert [e["val_loss"] for e in events(off, "eval")] == val
    assert [e["sample_text"] for e in events(hooked, "sample")] == [
        e["sample_text"] for e in events(plain, "sample")
    ]

    # run_start.hook_list: every enabled hook, forward hooks then update hooks, table order
    (start,) = events(hooked, "run_start")
    assert start["hook_list"] == [
        "forward_hook:activation_stats",
        "forward_hook:attention_entropy",
        "forward_hook:capture",
        "update_hook:grad_stats",
    ]
    for run in (plain, off):
        (start,) = events(run, "run_start")
        assert start["hook_list"] == []
        assert events(run, "forward_hook") == [] and events(run, "update_hook") == []
        assert not (run / "captures").exists()

    fh = events(hooked, "forward_hook")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for e in fh:
        by_name.setdefault(e["name"], []).append(e)
    assert sorted(by_name) == ["activation_stats", "attention_entropy", "capture"]
    resid = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]

    stats = by_name["activation_stats"]
    assert [(e["step"], e["phase"]) for e in stats] == [(s, "train") for s in range(1, 7)]
    for e in stats:
        assert list(e["metrics"]) == resid
        for point in resid:
            m = e["metrics"][point]
            assert list(m) == ["mean", "std", "rms", "abs_max", "frac_near_zero"]
            assert all(math.isfinite(v) for v in m.values())
            assert 0 < m["rms"] <= m["abs_max"] and 0 <= m["frac_near_zero"] <= 1
            assert m["std"] > 0 and abs(m["mean"]) <= m["rms"]

    entropy = by_name["attention_entropy"]
    assert [(e["step"], e["phase"]) for e in entropy] == [(2, "train"), (4, "train"), (6, "train")]
    for e in entropy:
        assert list(e["metrics"]) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
        for heads in e["metrics"].values():
            # 2 heads; with context 16 the mean over queries of ln(t+1) is the upper bound
            bound = sum(math.log(t + 1) for t in range(16)) / 16
            assert len(heads) == 2 and all(0 < v <= bound + 1e-5 for v in heads)

    capture = by_name["capture"]
    assert [(e["step"], e["phase"]) for e in capture] == [(3, "eval"), (6, "eval")]
    for e in capture:
        assert e["metrics"] == {
            "path": f"captures/step_{e['step']}.pt",
            "shapes": {p: [4, 16, 32] for p in resid},
        }
    files = sorted(p.name for p in (hooked / "captures").iterdir())
    assert files == ["step_3.pt", "step_6.pt"]

    # the capture holds the first validation batch's activations of the model at that step
    exp = load_experiment(hooked_path, manager)
    trainer = Trainer(exp, manager, str(hooked_path), runs_dir=tmp_path / "unused",
                      console=Console(quiet=True))  # fmt: skip
    model = trainer.model
    for step in (3, 6):
        saved = torch.load(hooked / "captures" / f"step_{step}.pt", weights_only=True)
        assert list(saved) == resid
        assert all(t.shape == (4, 16, 32) and t.dtype == torch.float32 for t in saved.values())
        model.load_state_dict(checkpoint.load(hooked / "checkpoints" / f"step_{step}.pt")["model"])
        model.eval()
        recorded = record_all(model)
        with torch.no_grad():
            model(trainer.data.val_batches[0][0])
        detach_all(model)
        seen = dict(recorded)
        for point in resid:
            assert torch.allclose(saved[point], seen[point], rtol=0, atol=1e-6), (step, point)

    grad_stats = events(hooked, "update_hook")
    assert [(e["step"], e["name"]) for e in grad_stats] == [(s, "grad_stats") for s in range(1, 7)]
    layers = {"tok_emb", "pos_emb", "blocks.0", "blocks.1", "ln_f", "head", "total"}
    for e in grad_stats:
        m = e["metrics"]
        assert set(m) == layers
        parts = [v for k, v in m.items() if k != "total"]
        assert m["total"] == pytest.approx(math.sqrt(sum(v * v for v in parts)), rel=1e-5)


# == 3. each built-in metric and transform on a hand-computed case =========================


def test_activation_stats_exact() -> None:
    hook = ActivationStats(ActivationStatsOptions())
    x = torch.tensor([[-2.0, 0.0, 0.0005, 2.0]])
    hook.observe("p", x)
    hook.observe("q", torch.tensor([[1.0, -3.0], [0.002, -0.0001]]))
    result = hook.flush(4, "train")
    values = [-2.0, 0.0, 0.0005, 2.0]
    mean = sum(values) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)  # unbiased
    rms = math.sqrt(sum(v * v for v in values) / 4)
    assert list(result) == ["p", "q"]
    p = result["p"]
    assert list(p) == ["mean", "std", "rms", "abs_max", "frac_near_zero"]
    assert p["mean"] == pytest.approx(mean, rel=1e-6)
    assert p["std"] == pytest.approx(std, rel=1e-6)
    assert p["std"] == pytest.approx(torch.std(x).item(), rel=1e-6)
    assert p["rms"] == pytest.approx(rms, rel=1e-6)
    assert p["abs_max"] == 2.0
    assert p["frac_near_zero"] == 0.5  # 0 and 0.0005 are below 1e-3
    q = result["q"]
    assert q["abs_max"] == 3.0  # the largest magnitude may be negative
    assert q["frac_near_zero"] == 0.25  # 0.002 is not near zero, -0.0001 is
    assert q["rms"] == pytest.approx(math.sqrt((1 + 9 + 0.002**2 + 0.0001**2) / 4), rel=1e-6)
    assert hook.flush(5, "train") is None  # nothing pending after a flush
    wide = ActivationStats(ActivationStatsOptions(near_zero=2.5))
    wide.observe("p", x)
    assert wide.flush(1, "train")["p"]["frac_near_zero"] == 1.0  # |2| < 2.5


@pytest.mark.filterwarnings("ignore:var_mean")
def test_activation_stats_rms_of_one_element() -> None:
    hook = ActivationStats(ActivationStatsOptions())
    hook.observe("p", torch.tensor([[-3.0]]))
    assert hook.flush(1, "train")["p"]["rms"] == 3.0


def test_attention_entropy_uniform_and_one_hot() -> None:
    hook = AttentionEntropy(None)
    k = 5
    uniform = torch.full((2, 1, 3, k), 1 / k)
    one_hot = torch.zeros(2, 1, 3, k)
    one_hot[..., 2] = 1
    hook.observe("uniform", uniform)
    hook.observe("mixed", torch.cat([uniform, one_hot], dim=1))  # head 0 uniform, head 1 sharp
    hook.observe("one_hot", one_hot)
    result = hook.flush(1, "train")
    assert list(result) == ["uniform", "mixed", "one_hot"]
    assert result["uniform"] == pytest.approx([math.log(k)], rel=1e-6)
    assert result["mixed"] == pytest.approx([math.log(k), 0.0], abs=1e-6)
    assert result["one_hot"] == [0.0]
    assert hook.flush(2, "train") is None
    # a causal uniform pattern: query t spreads over t + 1 keys; mean over queries
    t = 4
    causal = torch.ones(t, t).tril()
    causal = (causal / causal.sum(dim=-1, keepdim=True)).expand(1, 2, t, t)
    hook.observe("causal", causal)
    expected = sum(math.log(i + 1) for i in range(t)) / t
    assert hook.flush(3, "train")["causal"] == pytest.approx([expected, expected], rel=1e-6)


def grads_of(*values: list[float]) -> list[tuple[str, nn.Parameter]]:
    params = []
    for i, v in enumerate(values):
        p = nn.Parameter(torch.zeros(len(v)))
        p.grad = torch.tensor(v)
        params.append((f"p{i}", p))
    return params


def test_clip_grad_norm() -> None:
    params = grads_of([3.0, 0.0], [0.0, 4.0])
    metrics = ClipGradNorm(ClipOptions(max_norm=1.0)).apply(params, 1, True)
    assert to_plain(metrics) == {"grad_norm": 5.0}
    (_, a), (_, b) = params
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0]), rtol=1e-6, atol=0)
    assert torch.allclose(b.grad, torch.tensor([0.0, 0.8]), rtol=1e-6, atol=0)
    assert torch.linalg.vector_norm(torch.cat([a.grad, b.grad])).item() <= 1.0
    # a norm below max_norm: gradients untouched, bit for bit
    params = grads_of([3.0, 0.0], [0.0, 4.0])
    metrics = ClipGradNorm(ClipOptions(max_norm=10.0)).apply(params, 1, False)
    assert to_plain(metrics) == {"grad_norm": 5.0}
    assert torch.equal(params[0][1].grad, torch.tensor([3.0, 0.0]))
    assert torch.equal(params[1][1].grad, torch.tensor([0.0, 4.0]))


def test_grad_stats_groups_by_layer() -> None:
    shapes = {
        "tok_emb.weight": [[6.0]],
        "blocks.0.attn.qkv.weight": [[0.0, 2.0]],
        "blocks.0.attn.qkv.bias": [0.0],
        "blocks.1.ln_1.weight": [1.0, 2.0],
        "blocks.1.mlp.fc.bias": [2.0],
        "ln_f.weight": None,  # no gradient: left out
    }
    params = []
    for name, grad in shapes.items():
        p = nn.Parameter(torch.zeros(1) if grad is None else torch.zeros_like(torch.tensor(grad)))
        p.grad = None if grad is None else torch.tensor(grad)
        params.append((name, p))
    hook = GradStats(None)
    assert hook.apply(params, 1, log=False) is None
    norms = to_plain(hook.apply(params, 1, log=True))
    assert norms == {"tok_emb": 6.0, "blocks.0": 2.0, "blocks.1": 3.0, "total": 7.0}
    assert list(norms) == ["tok_emb", "blocks.0", "blocks.1", "total"]
    # grad_stats only looks
    assert torch.equal(params[3][1].grad, torch.tensor([1.0, 2.0]))


def test_grad_noise_variance_and_draws() -> None:
    hook = GradNoise(NoiseOptions(eta=0.3, gamma=0.55))
    for step in (1, 2, 3, 10, 1000):
        assert hook.variance(step) == pytest.approx(0.3 / step**0.55, rel=1e-12)
    assert hook.variance(1) == 0.3
    assert GradNoise(NoiseOptions(eta=0.5, gamma=0.0)).variance(77) == 0.5

    params = grads_of([1.0, -2.0, 3.0], [0.5, 0.25])
    params.append(("none", nn.Parameter(torch.zeros(2))))  # no grad: left alone
    before = [p.grad.clone() for _, p in params[:2]]
    torch.manual_seed(42)
    metrics = hook.apply(params, 4, True)
    std = math.sqrt(hook.variance(4))
    assert metrics == {"noise_std": std}
    torch.manual_seed(42)
    for g, (_, p) in zip(before, params[:2], strict=True):
        expected = g + std * torch.randn_like(g)
        assert torch.allclose(p.grad, expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p.grad, g)
    assert params[2][1].grad is None
    # zero gradients receive exactly the scaled draws
    params = grads_of([0.0] * 6)
    torch.manual_seed(3)
    hook.apply(params, 2, False)
    torch.manual_seed(3)
    assert torch.equal(params[0][1].grad, math.sqrt(hook.variance(2)) * torch.randn(6))


def test_grokfast_three_steps_by_hand() -> None:
    hook = Grokfast(GrokfastOptions(alpha=0.5, lamb=2.0))
    # h1 = g1 = 1            out = 1 + 2*1 = 3
    # h2 = .5*1 + .5*3 = 2   out = 3 + 2*2 = 7
    # h3 = .5*2 + .5*-2 = 0  out = -2 + 2*0 = -2
    for g, h, out in [(1.0, 1.0, 3.0), (3.0, 2.0, 7.0), (-2.0, 0.0, -2.0)]:
        params = grads_of([g], [10 * g])
        assert hook.apply(params, 1, True) is None
        assert params[0][1].grad.tolist() == [out]
        assert params[1][1].grad.tolist() == [10 * out]
        assert hook.ema["p0"].tolist() == [h]
        assert hook.ema["p1"].tolist() == [10 * h]


def test_grokfast_state_round_trip_continues_identically() -> None:
    options = GrokfastOptions(alpha=0.9, lamb=2.0)
    a = Grokfast(options)
    gen = torch.Generator().manual_seed(0)
    sequence = [torch.randn(3, generator=gen) for _ in range(5)]

    def step(hook: Grokfast, g: torch.Tensor) -> torch.Tensor:
        p = nn.Parameter(torch.zeros(3))
        p.grad = g.clone()
        hook.apply([("w", p)], 1, False)
        return p.grad

    for g in sequence[:2]:
        step(a, g)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = Grokfast(options)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    c = Grokfast(options)
    c.load_state_dict(a.state_dict())  # in memory: cloned, not shared
    for g in sequence[2:]:
        out = step(a, g)
        assert torch.equal(step(b, g), out)
        assert torch.equal(step(c, g), out)
    assert torch.equal(a.ema["w"], b.ema["w"]) and a.ema["w"] is not c.ema["w"]
    assert Grokfast(options).state_dict() == {"ema": {}}


def test_update_hooks_state_dict_and_logging() -> None:
    clip = update_hook(ClipGradNorm(ClipOptions(max_norm=1.0)), "clip_grad_norm")
    grok = update_hook(Grokfast(GrokfastOptions(alpha=0.5, lamb=1.0)), "grokfast")
    stats = update_hook(GradStats(None), "grad_stats")
    params = grads_of([3.0, 4.0])
    hooks = UpdateHooks([grok, clip, stats], params)
    assert hooks.apply(1, log=False) == []  # metrics are only read on logging steps
    params[0][1].grad = torch.tensor([3.0, 4.0])
    results = hooks.apply(2, log=True)
    assert [(e.name, sorted(m)) for e, m in results] == [
        ("clip_grad_norm", ["grad_norm"]), ("grad_stats", ["p0", "total"]),
    ]  # fmt: skip
    assert all(isinstance(v, float) for _, m in results for v in m.values())
    assert results[1][1]["total"] == pytest.approx(1.0, abs=1e-5)  # after clipping
    states = hooks.state_dict()
    assert states[1:] == [{}, {}] and list(states[0]["ema"]) == ["p0"]
    fresh_grok = update_hook(Grokfast(GrokfastOptions(alpha=0.5, lamb=1.0)), "grokfast")
    fresh = UpdateHooks([fresh_grok, clip, stats], params)
    fresh.load_state_dict(states)
    assert torch.equal(fresh_grok.hook.ema["p0"], grok.hook.ema["p0"])
    with pytest.raises(ValueError):
        fresh.load_state_dict(states[:2])  # one state per hook


# == 4. the order of update hooks matters ==================================================


def test_update_hook_order_matters() -> None:
    max_norm = 1.0

    def run(order: list[str]) -> torch.Tensor:
        params = [(f"p{i}", nn.Parameter(torch.zeros(50))) for i in range(2)]
        for i, (_, p) in enumerate(params):
            p.grad = torch.linspace(-1, 1, 50) * (i + 1)
        made = {
            "clip": update_hook(ClipGradNorm(ClipOptions(max_norm=max_norm)), "clip_grad_norm"),
            "noise": update_hook(GradNoise(NoiseOptions(eta=1.0, gamma=0.55)), "grad_noise"),
        }
        torch.manual_seed(9)
        UpdateHooks([made[name] for name in order], params).apply(1, log=True)
        return torch.cat([p.grad for _, p in params])

    clip_then_noise = run(["clip", "noise"])
    noise_then_clip = run(["noise", "clip"])
    assert not torch.allclose(clip_then_noise, noise_then_clip)
    assert torch.linalg.vector_norm(clip_then_noise).item() > max_norm
    assert torch.linalg.vector_norm(noise_then_clip).item() <= max_norm
    # the same order twice with the same seed is reproducible
    assert torch.equal(run(["clip", "noise"]), clip_then_noise)


# == 5. a failing hook stops the run with an error naming it ===============================


#: what the exploding hooks raise; a test swaps in SystemExit (a plugin calling sys.exit)
BOOM: BaseException = RuntimeError("boom")


class ExplodingForwardHook:
    default_points = ("hook_embed",)
    phases = ("train",)

    def __init__(self, options: Any) -> None:
        self.calls = 0

    def observe(self, point: str, activation: torch.Tensor) -> None:
        self.calls += 1  # one point, so one call per training step
        if self.calls == 3:
            raise BOOM

    def flush(self, step: int, phase: str) -> None:
        return None


class ExplodingUpdateHook:
    def __init__(self, options: Any) -> None:
        pass

    def apply(self, parameters: Any, step: int, log: bool) -> None:
        if step == 3:
            raise BOOM


class ForwardHookPlugin:
    @slmkit.hookimpl
    def register_forward_hooks(self, register):
        register("explode", ExplodingForwardHook)


class UpdateHookPlugin:
    @slmkit.hookimpl
    def register_update_hooks(self, register):
        register("explode", ExplodingUpdateHook)


class StepEndPlugin:
    @slmkit.hookimpl
    def on_step_end(self, step):
        if step == 3:
            raise BOOM


@pytest.mark.parametrize(
    ("plugin", "tables", "what"),
    [
        (ForwardHookPlugin(), {"forward_hooks": [{"name": "explode"}]},
         "forward hook 'explode'.observe"),
        (UpdateHookPlugin(), {"update_hooks": [{"name": "explode"}]},
         "update hook 'explode'.apply"),
        (StepEndPlugin(), {}, "run event on_step_end"),
    ],
    ids=["forward_hook", "update_hook", "run_event"],
)  # fmt: skip
@pytest.mark.parametrize("error", [RuntimeError("boom"), SystemExit("boom")], ids=repr)
def test_a_failing_hook_stops_the_run(
    write_experiment, tmp_path, monkeypatch, plugin, tables, what, error
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "BOOM", error)
    manager = PluginManager(entry_points=False).load()
    manager.add(plugin, "bad-plugin")
    path = write_experiment({
        "plugins": {"enable": ["bad-plugin"]},
        "training": {"max_steps": 6, "checkpoint_every": 2, "eval_every": 0},
        "sampling": {"every": 0},
        **tables,
    })  # fmt: skip
    runs = tmp_path / "runs"
    with pytest.raises(RunError) as caught:
        train(path, runs, manager)
    (run_dir,) = runs.iterdir()
    latest = run_dir / "checkpoints" / "latest.pt"
    assert str(caught.value) == (
        f"{what} (plugin 'bad-plugin') failed: {type(error).__name__}: boom at step 3; "
        f"the last checkpoint, {latest}, is intact"
    )
    failure = caught.value.__cause__
    assert isinstance(failure, HookFailure) and failure.plugin == "bad-plugin"
    assert failure.cause is error
    log = read_events(run_dir / "log.jsonl")
    assert log[-1]["event"] == "run_failed"
    assert log[-1]["step"] == 3 and log[-1]["error"] == str(caught.value)
    assert "run_end" not in [e["event"] for e in log]
    steps = [e["step"] for e in log if e["event"] == "train_step"]
    assert steps == ([1, 2, 3] if what.startswith("run event") else [1, 2])
    assert [e["step"] for e in log if e["event"] == "checkpoint"] == [2]
    assert checkpoint.load(run_dir)["step"] == 2
    assert checkpoint.load(latest)["step"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest.pt", "step_2.pt",
    ]  # fmt: skip


def test_a_hook_failing_before_any_checkpoint(write_experiment, tmp_path) -> None:
    manager = PluginManager(entry_points=False).load()
    manager.add(UpdateHookPlugin(), "bad-plugin")
    path = write_experiment({
        "plugins": {"enable": ["bad-plugin"]},
        "training": {"max_steps": 6, "checkpoint_every": 5, "eval_every": 0},
        "sampling": {"every": 0},
        "update_hooks": [{"name": "explode"}],
    })  # fmt: skip
    with pytest.raises(RunError, match=r"at step 3; no checkpoint had been written yet$"):
        train(path, tmp_path / "runs", manager)


def test_enabled_hook_call_wraps_exceptions() -> None:
    entry = update_hook(ExplodingUpdateHook(None), "explode")
    with pytest.raises(HookFailure) as caught:
        entry.call("apply", [], 3, False)
    assert str(caught.value) == (
        f"update hook 'explode'.apply (plugin '{BUILTIN_UPDATE}') failed: RuntimeError: boom"
    )
    assert entry.label == "update hook 'explode'"
    assert entry.call("apply", [], 2, False) is None


class Mutating:
    """A forward hook that changes what it observes: ``how`` says in which way."""

    default_points = ("blocks.0.hook_resid_post",)
    phases = ("train",)

    def __init__(self, how: str) -> None:
        self.how = how

    def observe(self, point: str, activation: torch.Tensor) -> None:
        if self.how == "add_":
            activation.add_(1.0)
        elif self.how == "view":  # through a view: views share the version counter
            activation.view(-1)[:3] = 0.0
        elif self.how == "float":  # .float() of a float32 tensor is that very tensor
            activation.float().mul_(2.0)

    def flush(self, step: int, phase: str) -> None:
        return None


@pytest.mark.parametrize("how", ["add_", "view", "float"])
def test_a_forward_hook_that_modifies_its_activation_is_refused(how: str) -> None:
    model = tiny_model().eval()
    x = tokens()
    plain, _ = model(x)
    entry = EnabledHook("forward_hook", "mutate", "sneaky-plugin", Mutating(how))
    entry.points = ["blocks.0.hook_resid_post"]
    hooks = ForwardHooks([entry], model.hook_points)
    hooks.begin("train", 1)
    with pytest.raises(HookFailure) as caught:
        model(x)
    hooks.detach()
    assert str(caught.value) == (
        "forward hook 'mutate'.observe (plugin 'sneaky-plugin') failed: ActivationModified: "
        "it modified the activation at 'blocks.0.hook_resid_post' in place, which would "
        "change what the model computes; observers must only read (work on "
        "activation.clone())"
    )
    assert caught.value.plugin == "sneaky-plugin"
    assert torch.equal(model(x)[0], plain)


def test_an_observer_under_inference_mode_gets_a_copy() -> None:
    """Inference tensors have no version counter: the observer gets a copy to change."""
    model = tiny_model().eval()
    x = tokens()
    plain, _ = model(x)
    entry = EnabledHook("forward_hook", "mutate", "sneaky-plugin", Mutating("add_"))
    entry.points = ["blocks.0.hook_resid_post"]
    hooks = ForwardHooks([entry], model.hook_points)
    hooks.begin("train", 1)
    with torch.inference_mode():
        watched, _ = model(x)
    hooks.detach()
    assert torch.equal(watched, plain)


class MutatingPlugin:
    @slmkit.hookimpl
    def register_forward_hooks(self, register):
        register("mutate", lambda options: Mutating("add_"))


def test_a_run_with_a_modifying_forward_hook_stops_naming_it(write_experiment, tmp_path) -> None:
    manager = PluginManager(entry_points=False).load()
    manager.add(MutatingPlugin(), "sneaky-plugin")
    path = write_experiment({
        "plugins": {"enable": ["sneaky-plugin"]},
        "training": {"max_steps": 4, "checkpoint_every": 2, "eval_every": 0},
        "sampling": {"every": 0},
        "forward_hooks": [{"name": "mutate", "every": 3}],
    })  # fmt: skip
    runs = tmp_path / "runs"
    with pytest.raises(RunError) as caught:
        train(path, runs, manager)
    (run_dir,) = runs.iterdir()
    assert str(caught.value).startswith(
        "forward hook 'mutate'.observe (plugin 'sneaky-plugin') failed: ActivationModified: "
        "it modified the activation at 'blocks.0.hook_resid_post' in place"
    )
    assert str(caught.value).endswith(
        f"at step 3; the last checkpoint, {run_dir / 'checkpoints' / 'latest.pt'}, is intact"
    )
    log = read_events(run_dir / "log.jsonl")
    assert log[-1]["event"] == "run_failed" and log[-1]["step"] == 3
    assert [e["step"] for e in log if e["event"] == "train_step"] == [1, 2]


# == 6. a glob matching no hook point ======================================================


def test_a_glob_matching_no_point_is_a_config_error(write_experiment, manager, tmp_path) -> None:
    path = write_experiment({"forward_hooks": [
        {"name": "activation_stats", "points": ["blocks.*.hook_resid_post"]},
        {"name": "activation_stats", "points": ["hook_embed"]},
    ]})  # fmt: skip
    bad = write_experiment({"forward_hooks": [
        {"name": "activation_stats", "points": ["blocks.*.hook_nope"]},
    ]}, name="bad.toml")  # fmt: skip
    runs = tmp_path / "runs"
    exp = load_experiment(bad, manager)  # the experiment itself is valid
    with pytest.raises(ConfigError) as caught:
        Trainer(exp, manager, str(bad), runs_dir=runs, console=Console(quiet=True))
    assert caught.value.key == "forward_hooks.0.points"
    assert str(caught.value).startswith(f"{bad}: forward_hooks.0.points: 'blocks.*.hook_nope'")
    assert "matches no hook point" in str(caught.value)
    assert not runs.exists()
    # the index names the table
    two = write_experiment({"forward_hooks": [
        {"name": "activation_stats", "points": ["hook_embed"]},
        {"name": "capture", "points": ["hook_embed", "ln_f.nope"]},
    ]}, name="two.toml")  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        Trainer(load_experiment(two, manager), manager, str(two), runs_dir=runs)
    assert caught.value.key == "forward_hooks.1.points" and "'ln_f.nope'" in str(caught.value)
    # valid globs build fine; a disabled table is not checked at all
    trainer = Trainer(load_experiment(path, manager), manager, str(path), runs_dir=runs)
    assert trainer.forward_hooks is not None
    assert [h.points for h in trainer.forward_hooks.hooks] == [
        ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], ["hook_embed"],
    ]  # fmt: skip
    off = write_experiment({"forward_hooks": [
        {"name": "activation_stats", "points": ["blocks.*.hook_nope"], "enabled": False},
    ]}, name="off.toml")  # fmt: skip
    trainer = Trainer(load_experiment(off, manager), manager, str(off), runs_dir=runs)
    assert trainer.forward_hooks is None
    assert not runs.exists()


# == 7. resume with stateful and random update hooks is bit-exact ==========================


def test_resume_with_update_hooks_is_bit_exact(write_experiment, manager, tmp_path) -> None:
    path = write_experiment({
        "training": {"max_steps": 8, "checkpoint_every": 2},
        "update_hooks": [
            {"name": "grokfast", "alpha": 0.9, "lamb": 2.0},
            {"name": "grad_noise", "eta": 0.01},
            {"name": "clip_grad_norm", "max_norm": 0.5},
        ],
    })  # fmt: skip
    full = train(path, tmp_path / "full", manager)
    half = train(path, tmp_path / "half", manager, ["training.max_steps=4"])
    assert [s for s, _ in losses(half)] == [1, 2, 3, 4]
    resumed = train(path, tmp_path / "unused", manager, resume=half)
    assert resumed == half
    assert losses(resumed) == losses(full)
    assert_same_parameters(resumed, full)
    full_hooks = checkpoint.load(full)["update_hooks"]
    resumed_hooks = checkpoint.load(resumed)["update_hooks"]
    assert [list(s) for s in full_hooks] == [["ema"], [], []]
    assert full_hooks[0]["ema"].keys() == resumed_hooks[0]["ema"].keys()
    for name, ema in full_hooks[0]["ema"].items():
        assert torch.equal(ema, resumed_hooks[0]["ema"][name]), name
    starts = events(half, "run_start")
    assert [s["hook_list"] for s in starts] == [
        ["update_hook:grokfast", "update_hook:grad_noise", "update_hook:clip_grad_norm"]
    ] * 2
    assert [s["resumed_from_step"] for s in starts] == [None, 4]

    # the hooks really act: the logged metrics match in both runs, and clip saw real norms
    def hook_events(run: Path) -> list[tuple[int, str, Any]]:
        return [(e["step"], e["name"], e["metrics"]) for e in events(run, "update_hook")]

    assert hook_events(resumed) == hook_events(full)
    noise = [m["noise_std"] for s, n, m in hook_events(full) if n == "grad_noise"]
    assert noise == pytest.approx([math.sqrt(0.01 / s**0.55) for s in range(1, 9)])
    # and they change the run: without them the losses differ
    plain = train(write_experiment({"training": {"max_steps": 8, "checkpoint_every": 2}},
                                   name="plain.toml"), tmp_path / "plain", manager)  # fmt: skip
    assert [v for _, v in losses(plain)][1:] != [v for _, v in losses(full)][1:]
