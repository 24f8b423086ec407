"""Probes: each built-in on hand-built models whose answer is known, runs that stay bit for
bit the same with probes, the ``probe`` events, and every way a probe can be refused."""

from __future__ import annotations

import math
import random
from fnmatch import fnmatchcase
from typing import Any

import attrs
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_parameters, events, losses, train
from slmkit_builtin.gpt import GPTBlock, GPTOptions
from slmkit_builtin.probes import (
    AttentionEntropyProbe,
    Induction,
    InductionOptions,
    LogitLens,
    PreviousToken,
    TextOptions,
)
from torch import nn

import slmkit
from slmkit import checkpoint
from slmkit.build import build_parts
from slmkit.components import ModelDims, ProbeSetup
from slmkit.config.resolve import load_experiment
from slmkit.errors import ConfigError, HookFailure, RunError
from slmkit.hookpoint import HookPoint
from slmkit.hooks import EnabledHook
from slmkit.model import LanguageModel
from slmkit.plugins import PluginManager
from slmkit.probes import EnabledProbe, Probes
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.train import Trainer

ALL_BUILTINS = ["induction", "previous_token", "logit_lens", "attention_entropy"]


# == helpers: measuring one probe as the kernel does ========================================


class Tokenizer:
    """What a probe sees of the tokenizer: no padding token."""

    pad_id = None


class Log:
    """Stands in for the run: keeps what the probes log."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def log(self, event: str, /, **fields: Any) -> None:
        self.events.append({"event": event, **fields})


def measure(probe: Any, model: LanguageModel, seed: int = 0) -> dict[str, Any]:
    """The metrics ``probe`` logs for ``model``, through the kernel's :class:`Probes`."""
    val_tokens = torch.randint(model.dims.vocab_size, (400,), generator=torch.Generator())
    setup = ProbeSetup(model.dims, Tokenizer(), torch.Generator().manual_seed(seed), val_tokens)
    tokens = probe.inputs(setup)
    points = [n for n in model.hook_points if any(fnmatchcase(n, g) for g in probe.points)]
    entry = EnabledHook("probe", "under_test", "test-plugin", probe)
    probes = Probes([EnabledProbe(entry, points, tokens)], model, Tokenizer(), 1, 1)
    log = Log()
    probes.measure(log, 1)  # type: ignore[arg-type]
    (event,) = log.events
    assert event["event"] == "probe" and event["step"] == 1
    return event["metrics"]


# == hand-built models ======================================================================


class HandBlock(nn.Module):
    """One attention head whose weights are set by hand; no norm, no MLP.

    ``x + softmax(causal(q k^T)) v`` with ``q = x Wq + bq``, ``k = x Wk``, ``v = x Wv``;
    the hook points are those the built-in probes read.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.wq = nn.Parameter(torch.zeros(d_model, d_model))
        self.bq = nn.Parameter(torch.zeros(d_model))
        self.wk = nn.Parameter(torch.zeros(d_model, d_model))
        self.wv = nn.Parameter(torch.zeros(d_model, d_model))
        self.attn = nn.Module()
        self.attn.hook_pattern = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: torch.Tensor, ctx: slmkit.BlockContext) -> torch.Tensor:
        q, k, v = x @ self.wq + self.bq, x @ self.wk, x @ self.wv
        time = x.shape[1]
        scores = (q @ k.transpose(-2, -1)).unsqueeze(1)  # one head
        allowed = slmkit.causal_mask(time, time, x.device)
        pattern = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        pattern = self.attn.hook_pattern(pattern)
        return self.hook_resid_post(x + pattern.squeeze(1) @ v)


VOCAB, CONTEXT = 10, 16
# the residual stream's slots: the token, the previous token (written by layer 0), the
# prediction (written by layer 1), the position, and one for a constant
TOKEN, PREVIOUS, PREDICTION, POSITION = 0, VOCAB, 2 * VOCAB, 3 * VOCAB
CONSTANT = 3 * VOCAB + CONTEXT
D_MODEL = CONSTANT + 1
SHARP = 40.0  # attention scores this far apart put all the weight on one position


def hand_model(n_layers: int) -> LanguageModel:
    """Layer 0: a previous-token head; layer 1 (if any): an induction head reading it.

    Layer 0 attends from position t to t - 1 (by the position slots) and copies that
    token into the previous-token slot. Layer 1 attends from a position holding token a
    to the positions whose previous token was a, and copies their token into the
    prediction slot, which the head reads: on a repeated sequence it predicts the repeat.
    """
    dims = ModelDims(n_layers=n_layers, d_model=D_MODEL, n_heads=1, d_ff=1, dropout=0.0,
                     context_length=CONTEXT, vocab_size=VOCAB)  # fmt: skip
    model = LanguageModel(dims, lambda layer: HandBlock(D_MODEL))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.ln_f.weight.fill_(1.0)
        for v in range(VOCAB):
            model.tok_emb.weight[v, TOKEN + v] = 1.0
            model.head.weight[v, PREDICTION + v] = 10.0
        for t in range(CONTEXT):
            model.pos_emb.weight[t, POSITION + t] = 1.0
        previous = model.blocks[0]
        for t in range(1, CONTEXT):
            previous.wq[POSITION + t, POSITION + t - 1] = SHARP  # query t looks for key t-1
        for t in range(CONTEXT):
            previous.wk[POSITION + t, POSITION + t] = 1.0
        for v in range(VOCAB):
            previous.wv[TOKEN + v, PREVIOUS + v] = 1.0
        if n_layers > 1:
            induction = model.blocks[1]
            for v in range(VOCAB):
                induction.wq[TOKEN + v, PREVIOUS + v] = SHARP  # token a looks for "after a"
                induction.wk[PREVIOUS + v, PREVIOUS + v] = 1.0
                induction.wv[TOKEN + v, PREDICTION + v] = 1.0
            # position 0 attends to itself in layer 0, so its previous-token slot holds its
            # own token: keep the induction head away from it
            induction.bq[CONSTANT] = 1.0
            induction.wk[POSITION, CONSTANT] = -2 * SHARP
    return model.eval()


def test_a_previous_token_head_scores_one_and_no_induction() -> None:
    model = hand_model(n_layers=1)
    previous = measure(PreviousToken(TextOptions(batch_size=4)), model)
    assert previous == {"score": [[pytest.approx(1.0, abs=1e-6)]]}
    induction = measure(Induction(InductionOptions(batch_size=4, seq_len=6)), model)
    assert induction["score"] == [[pytest.approx(0.0, abs=1e-6)]]


def test_an_induction_circuit_scores_one_and_predicts_the_repeat() -> None:
    model = hand_model(n_layers=2)
    m = measure(Induction(InductionOptions(batch_size=8)), model)
    # layer 0 attends to the previous position, layer 1 after the earlier occurrence
    assert m["score"] == [[pytest.approx(0.0, abs=1e-6)], [pytest.approx(1.0, abs=1e-6)]]
    assert m["loss_repeat_half"] < 1e-3  # the repeat is copied
    assert m["loss_first_half"] > 1.0  # nothing to copy from in the first half
    assert m["loss_drop"] == m["loss_first_half"] - m["loss_repeat_half"]
    previous = measure(PreviousToken(TextOptions(batch_size=4)), model)
    assert previous["score"][0] == [pytest.approx(1.0, abs=1e-6)]


def test_the_induction_batch_draws_only_tokens_the_validation_split_holds() -> None:
    # A small-alphabet corpus leaves most ids unseen: their logits were pushed down in
    # training, so drawing them would hide a working induction head.
    dims = ModelDims(n_layers=1, d_model=4, n_heads=1, d_ff=4, dropout=0.0,
                     context_length=CONTEXT, vocab_size=VOCAB)  # fmt: skip

    class Padded:
        pad_id = 0

    val = torch.tensor([0, 2, 4, 2, 5, 7, 0, 4, 8, 9], dtype=torch.uint8)  # of ids 0..9
    setup = ProbeSetup(dims, Padded(), torch.Generator().manual_seed(1), val)
    tokens = Induction(InductionOptions(batch_size=6, seq_len=4)).inputs(setup)
    assert set(tokens.flatten().tolist()) <= {2, 4, 5, 7, 8, 9}  # no pad, no unseen id
    for row in tokens[:, :4].tolist():
        assert len(set(row)) == 4


def test_the_induction_batch_is_a_random_sequence_repeated_once() -> None:
    dims = ModelDims(n_layers=1, d_model=4, n_heads=1, d_ff=4, dropout=0.0,
                     context_length=CONTEXT, vocab_size=VOCAB)  # fmt: skip

    class Padded:
        pad_id = 3

    def batch(seed: int, **options: int) -> torch.Tensor:
        setup = ProbeSetup(dims, Padded(), torch.Generator().manual_seed(seed), torch.zeros(0))
        return Induction(InductionOptions(**options)).inputs(setup)

    tokens = batch(5, batch_size=3, seq_len=8)
    assert tokens.shape == (3, 16)
    assert torch.equal(tokens[:, :8], tokens[:, 8:])
    for row in tokens[:, :8].tolist():
        assert len(set(row)) == 8 and 3 not in row  # distinct, never the padding id
    assert torch.equal(batch(5, batch_size=3, seq_len=8), tokens)  # the seed fixes it
    assert not torch.equal(batch(6, batch_size=3, seq_len=8), tokens)
    assert batch(0).shape == (16, 16)  # default: (context + 1) // 2 tokens, twice
    dims = attrs.evolve(dims, vocab_size=5)  # fewer tokens than a sequence: some repeat
    repeating = batch(0, batch_size=4, seq_len=8)
    assert torch.equal(repeating[:, :8], repeating[:, 8:])
    assert set(repeating.flatten().tolist()) == {0, 1, 2, 4}


@pytest.mark.parametrize("final_norm", [True, False])
def test_logit_lens_reads_each_layer_and_the_last_is_the_models_own_loss(final_norm: bool) -> None:
    dims = ModelDims(n_layers=3, d_model=16, n_heads=2, d_ff=24, dropout=0.0,
                     context_length=12, vocab_size=11)  # fmt: skip
    torch.manual_seed(0)
    model = LanguageModel(
        dims, lambda layer: GPTBlock(GPTOptions(), dims, layer), final_norm=final_norm
    ).eval()
    assert (model.ln_f is None) is not final_norm
    probe = LogitLens(TextOptions(batch_size=5, seq_len=9))
    lens = measure(probe, model, seed=4)["loss"]
    val_tokens = torch.randint(11, (400,), generator=torch.Generator())
    setup = ProbeSetup(dims, Tokenizer(), torch.Generator().manual_seed(4), val_tokens)
    tokens = probe.inputs(setup)
    assert tokens.shape == (5, 10)
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        _, own_loss = model(x, y)
        residual = model.tok_emb(x) + model.pos_emb(torch.arange(9))
        by_hand = []
        for block in model.blocks:
            residual = block(residual, slmkit.BlockContext(torch.arange(9)))
            # without a final norm the head reads the residual stream itself
            logits = model.head(model.ln_f(residual) if final_norm else residual)
            by_hand.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    assert own_loss is not None
    assert len(lens) == 3
    assert lens[-1] == own_loss.item()  # exactly
    assert lens == pytest.approx(by_hand, rel=1e-6)
    assert lens[0] != lens[-1]


def test_attention_entropy_of_uniform_and_of_one_hot_attention() -> None:
    uniform = hand_model(n_layers=1)
    with torch.no_grad():
        uniform.blocks[0].wq.zero_()  # equal scores: each query spreads over its keys
    probe = AttentionEntropyProbe(TextOptions(batch_size=3, seq_len=10))
    (entropy,) = measure(probe, uniform)["entropy"]
    assert entropy == [pytest.approx(sum(math.log(t + 1) for t in range(10)) / 10, rel=1e-6)]
    (sharp,) = measure(probe, hand_model(n_layers=1))["entropy"]
    assert sharp == [pytest.approx(0.0, abs=1e-6)]


def test_text_probes_read_seeded_windows_of_the_validation_split() -> None:
    dims = ModelDims(n_layers=1, d_model=4, n_heads=1, d_ff=4, dropout=0.0,
                     context_length=8, vocab_size=50)  # fmt: skip
    val = torch.arange(40)

    def windows(seed: int, **options: int) -> torch.Tensor:
        setup = ProbeSetup(dims, Tokenizer(), torch.Generator().manual_seed(seed), val)
        return PreviousToken(TextOptions(**options)).inputs(setup)

    tokens = windows(1, batch_size=6, seq_len=5)
    assert tokens.shape == (6, 6)
    for row in tokens.tolist():  # consecutive validation tokens
        assert row == list(range(row[0], row[0] + 6))
    assert torch.equal(windows(1, batch_size=6, seq_len=5), tokens)
    assert windows(1).shape == (8, 9)  # default: 8 windows of the context length


# == runs: probes change nothing; their events ==============================================


class Meddler:
    """A probe that draws from every global RNG, computes gradients and leaves the model in
    training mode."""

    points = ("hook_embed",)

    def __init__(self, options: Any) -> None:
        pass

    def inputs(self, setup: ProbeSetup) -> torch.Tensor:
        torch.rand(3)
        random.random()
        np.random.rand()
        return torch.zeros(2, 4, dtype=torch.long)

    def measure(self, probe: slmkit.ProbeContext) -> dict[str, Any]:
        with torch.enable_grad():  # gradients (an attribution, say) are allowed, and dropped
            logits, seen = probe.forward(probe.tokens)
            logits.square().sum().backward()
        probe.model.train()
        return {"drawn": torch.rand(()).item() + random.random() + np.random.rand(),
                "embed_norm": seen["hook_embed"].norm()}  # fmt: skip


class MeddlerPlugin:
    @slmkit.hookimpl
    def register_probes(self, register: slmkit.Register) -> None:
        register("meddler", Meddler)


RUN = {
    "training": {"max_steps": 7, "eval_every": 3, "checkpoint_every": 3},
    "model": {"context_length": 16},
}


def test_a_run_with_probes_trains_bit_for_bit_as_one_without(write_experiment, tmp_path) -> None:
    manager = PluginManager(entry_points=False).load()
    manager.add(MeddlerPlugin(), "meddling-plugin")
    probes = [{"name": name} for name in ALL_BUILTINS]
    plain = write_experiment(RUN, name="plain.toml")
    probed = write_experiment({**RUN, "probes": probes}, name="probed.toml")
    meddled = write_experiment({
        **RUN, "plugins": {"enable": ["meddling-plugin"]}, "probes": [{"name": "meddler"}],
    }, name="meddled.toml")  # fmt: skip
    off = write_experiment(
        {**RUN, "probes": [{**p, "enabled": False} for p in probes]}, name="off.toml"
    )
    runs = {name: train(path, tmp_path / name, manager)
            for name, path in [("plain", plain), ("probed", probed), ("meddled", meddled),
                               ("off", off)]}  # fmt: skip

    # dropout is on (0.1): a probe that moved the RNG would change every later loss
    assert [s for s, _ in losses(runs["plain"])] == [1, 2, 3, 4, 5, 6, 7]
    val = [e["val_loss"] for e in events(runs["plain"], "eval")]
    samples = [e["sample_text"] for e in events(runs["plain"], "sample")]
    for name in ("probed", "meddled", "off"):
        assert losses(runs[name]) == losses(runs["plain"]), name
        assert [e["val_loss"] for e in events(runs[name], "eval")] == val, name
        assert [e["sample_text"] for e in events(runs[name], "sample")] == samples, name
        assert_same_parameters(runs[name], runs["plain"])
    assert events(runs["plain"], "probe") == events(runs["off"], "probe") == []
    (start,) = events(runs["probed"], "run_start")
    assert start["hook_list"] == [f"probe:{name}" for name in ALL_BUILTINS]
    assert [e["step"] for e in events(runs["meddled"], "probe")] == [3, 6, 7]


def test_probe_events_in_the_log(write_experiment, manager, tmp_path) -> None:
    path = write_experiment({**RUN, "probes": [
        *({"name": name} for name in ALL_BUILTINS),
        {"name": "induction", "every": 2, "seed": 5, "seq_len": 4, "batch_size": 2},
    ]})  # fmt: skip
    run_dir = train(path, tmp_path / "runs", manager)
    log = read_events(run_dir / "log.jsonl")
    probe_events = [e for e in log if e["event"] == "probe"]
    # evaluations at 3, 6 and the last step, 7; every = 2: the 2nd evaluation and the last
    assert [(e["step"], e["probe"]) for e in probe_events] == [
        *((3, name) for name in ALL_BUILTINS),
        *((6, name) for name in ALL_BUILTINS), (6, "induction"),
        *((7, name) for name in ALL_BUILTINS), (7, "induction"),
    ]  # fmt: skip
    order = [e["event"] for e in log if e["event"] in ("eval", "probe", "checkpoint")]
    assert order[:6] == ["eval", "probe", "probe", "probe", "probe", "checkpoint"]
    for e in probe_events:
        assert e["plugin"] == "slmkit_builtin.probes"
        m = e["metrics"]
        per_head = m.get("score", m.get("entropy"))
        if e["probe"] == "logit_lens":
            assert list(m) == ["loss"] and len(m["loss"]) == 2
            assert all(isinstance(v, float) and v > 0 for v in m["loss"])
        else:  # [layer][head]: 2 layers of 2 heads
            assert len(per_head) == 2 and all(len(heads) == 2 for heads in per_head)
            assert all(isinstance(v, float) for heads in per_head for v in heads)
        if e["probe"] == "induction":
            assert list(m) == ["score", "loss_first_half", "loss_repeat_half", "loss_drop"]
            assert m["loss_drop"] == m["loss_first_half"] - m["loss_repeat_half"]
        if e["probe"] == "attention_entropy":  # context 16: below ln(t + 1) averaged
            bound = sum(math.log(t + 1) for t in range(16)) / 16
            assert all(0 < v <= bound + 1e-5 for heads in per_head for v in heads)
    # the same batch every time: a probe's two tables differ only by their batch
    first, other = (e for e in probe_events if e["step"] == 6 and e["probe"] == "induction")
    assert first["metrics"] != other["metrics"]


def test_without_probes_nothing_is_built_or_called(write_experiment, manager, tmp_path,
                                                   monkeypatch) -> None:  # fmt: skip
    def refuse(*args: Any) -> None:
        raise AssertionError("Probes.measure was called")

    monkeypatch.setattr(Probes, "measure", refuse)
    for changes in ({}, {"probes": [{"name": "induction", "enabled": False}]}):
        path = write_experiment({**RUN, **changes})
        exp = load_experiment(path, manager)
        trainer = Trainer(exp, manager, str(path), runs_dir=tmp_path / "runs",
                          console=Console(quiet=True))  # fmt: skip
        assert trainer.probes is None
        trainer.run()


# == bad input ==============================================================================


class PlainBlock(nn.Module):
    """A third-party block with a residual stream point but no attention pattern."""

    def __init__(self, options: Any, dims: slmkit.ModelDims, layer: int) -> None:
        super().__init__()
        self.mix = nn.Linear(dims.d_model, dims.d_model)
        self.hook_resid_post = slmkit.HookPoint()

    def forward(self, x: torch.Tensor, ctx: slmkit.BlockContext) -> torch.Tensor:
        return self.hook_resid_post(x + self.mix(x))


class PlainBlockPlugin:
    @slmkit.hookimpl
    def register_blocks(self, register: slmkit.Register) -> None:
        register("plain", PlainBlock)


def test_a_probe_reading_a_point_the_block_lacks_is_refused_at_validation(
    write_experiment, tmp_path
) -> None:
    manager = PluginManager(entry_points=False).load()
    manager.add(PlainBlockPlugin(), "plain-blocks")
    base = {"plugins": {"enable": ["plain-blocks"]}, "model": {"block": "plain"}}
    path = write_experiment({**base, "probes": [{"name": "logit_lens"}, {"name": "induction"}]})
    exp = load_experiment(path, manager)
    with pytest.raises(ConfigError) as caught:
        build_parts(exp, torch.device("cpu"), meta=True)  # what `slmkit validate` runs
    assert str(caught.value) == (
        f"{path}: probes.1.name: probe 'induction' (plugin 'slmkit_builtin.probes') reads "
        "the hook point 'blocks.*.attn.hook_pattern', which this model does not have (its "
        "blocks are 'plain'; docs/hooks.md lists the points)"
    )
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="probes.1.name: probe 'induction'"):
        Trainer(exp, manager, str(path), runs_dir=runs, console=Console(quiet=True))
    assert not runs.exists()
    # the residual stream it has is enough for the logit lens
    lens = write_experiment({**base, "probes": [{"name": "logit_lens"}]}, name="lens.toml")
    run_dir = train(lens, runs, manager)
    assert [e["step"] for e in events(run_dir, "probe")] == [3, 6]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"name": "induction", "seq_len": 20},
         "probes.0.seq_len: must be in [2, 16] (the sequence and its repeat fit in "
         "context_length + 1 tokens; 0: 16), got 20"),
        ({"name": "logit_lens", "seq_len": 40},
         "probes.0.seq_len: must be in [2, context_length = 32] (0: 32), got 40"),
        ({"name": "previous_token", "batch_size": 0}, "probes.0.batch_size: must be > 0, got 0"),
        ({"name": "induction", "every": 0}, "probes.0.every: must be > 0, got 0"),
        ({"name": "induction", "seed": -1}, "probes.0.seed: must be >= 0, got -1"),
        ({"name": "inductoin"}, "probes.0.name: unknown probe 'inductoin'"),
        ({"name": "induction", "points": ["x"]}, "probes.0.points: unknown key"),
    ],
    ids=["induction-too-long", "window-too-long", "batch", "every", "seed", "name", "key"],
)  # fmt: skip
def test_bad_probe_tables_are_one_line_errors(write_experiment, cli, tmp_path, table,
                                              message) -> None:  # fmt: skip
    path = write_experiment({"probes": [table]})
    done = cli("validate", str(path), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith(f"slmkit: error: {path}: {message}"), done.stderr
    assert done.stderr.count("\n") == 1


class BadProbe:
    """A probe that fails in the way ``how`` says, at the evaluation of step 3 or at build."""

    points: tuple[str, ...] = ()

    def __init__(self, how: str) -> None:
        self.how = how

    def inputs(self, setup: ProbeSetup) -> Any:
        if self.how == "inputs":
            raise RuntimeError("no inputs")
        if self.how == "batch":
            return torch.zeros(2, 100, dtype=torch.long)  # longer than the context
        return torch.zeros(2, 4, dtype=torch.long)

    def measure(self, probe: slmkit.ProbeContext) -> dict[str, Any]:
        if probe.step < 3:
            return {"fine": 1.0}
        if self.how == "raise":
            raise RuntimeError("boom")
        if self.how == "parameter":
            probe.model.head.weight.mul_(2.0)
            probe.model.tok_emb.weight.mul_(2.0)
            return {}
        return {"words": "not a number"}


def bad_probe_run(write_experiment, tmp_path, how: str) -> tuple[pytest.ExceptionInfo, Any]:
    manager = PluginManager(entry_points=False).load()

    class Plugin:
        @slmkit.hookimpl
        def register_probes(self, register: slmkit.Register) -> None:
            register("bad", lambda options: BadProbe(how))

    manager.add(Plugin(), "bad-plugin")
    path = write_experiment({
        "plugins": {"enable": ["bad-plugin"]},
        "training": {"max_steps": 6, "checkpoint_every": 2, "eval_every": 1},
        "sampling": {"every": 0},
        "probes": [{"name": "bad"}],
    })  # fmt: skip
    runs = tmp_path / "runs"
    with pytest.raises((RunError, ConfigError)) as caught:
        train(path, runs, manager)
    return caught, runs


@pytest.mark.parametrize(
    ("how", "what"),
    [
        ("raise", "RuntimeError: boom"),
        ("parameter", "ParameterModified: it changed the model's 'tok_emb.weight' and 1 more "
                      "in place; a probe must only read the model (work on a copy)"),
        ("metrics", "MetricsRefused: its metric 'words' is a str, not a number, a list of "
                    "numbers or a list of such lists"),
    ],
)  # fmt: skip
def test_a_failing_probe_stops_the_run_naming_it_and_keeps_the_checkpoints(
    write_experiment, tmp_path, how, what
) -> None:
    caught, runs = bad_probe_run(write_experiment, tmp_path, how)
    (run_dir,) = runs.iterdir()
    latest = run_dir / "checkpoints" / "latest.pt"
    assert isinstance(caught.value, RunError)
    assert str(caught.value) == (
        f"probe 'bad'.measure (plugin 'bad-plugin') failed: {what} at step 3; "
        f"the last checkpoint, {latest}, is intact"
    )
    assert isinstance(caught.value.__cause__, HookFailure)
    log = read_events(run_dir / "log.jsonl")
    assert log[-1] == {**log[-1], "event": "run_failed", "step": 3, "error": str(caught.value)}
    assert [e["step"] for e in log if e["event"] == "probe"] == [1, 2]
    assert checkpoint.load(latest)["step"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest.pt", "step_2.pt",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("inputs", "probes.0: probe 'bad'.inputs (plugin 'bad-plugin') failed: RuntimeError: "
                   "no inputs"),
        ("batch", "probes.0: probe 'bad' (plugin 'bad-plugin') made its batch as torch.int64 "
                  "of shape [2, 100]; it must be token ids below"),
    ],
)  # fmt: skip
def test_a_probe_failing_to_make_its_batch_is_refused_before_the_run(
    write_experiment, tmp_path, how, message
) -> None:
    caught, runs = bad_probe_run(write_experiment, tmp_path, how)
    assert isinstance(caught.value, ConfigError)
    assert message in str(caught.value)
    assert not runs.exists()


# == the worked example of docs/hooks.md ====================================================


def test_the_worked_example_of_a_probe_runs(write_experiment, tmp_path) -> None:
    import re
    import types

    from conftest import ROOT

    text = (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8")
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "register_probes" in c]
    module = types.ModuleType("slmkit_sink")
    exec(compile(code, "docs/hooks.md", "exec"), module.__dict__)
    manager = PluginManager(entry_points=False).load()
    assert manager.add(module, "slmkit-sink").provides == {"probe": ["attention_sink"]}
    path = write_experiment({
        **RUN, "plugins": {"enable": ["slmkit-sink"]},
        "probes": [{"name": "attention_sink", "batch_size": 4}],
    })  # fmt: skip
    run_dir = train(path, tmp_path / "runs", manager)
    logged = events(run_dir, "probe")
    assert [(e["step"], e["probe"], e["plugin"]) for e in logged] == [
        (step, "attention_sink", "slmkit-sink") for step in (3, 6, 7)
    ]
    for e in logged:
        (sink,) = e["metrics"].values()
        assert len(sink) == 2 and all(len(heads) == 2 for heads in sink)  # [layer][head]
        assert all(0 < v < 1 for heads in sink for v in heads)
