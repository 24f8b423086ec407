"""Training options: gradient accumulation, precision, compile, tied embeddings, top-k/top-p."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, Interrupt, assert_same_parameters, events, merge

import slmkit
import slmkit.stepper
from slmkit import checkpoint
from slmkit.build import build_model, build_tokenizer
from slmkit.cli import main
from slmkit.components import ModelDims
from slmkit.config.resolve import experiment_from_dict, load_experiment
from slmkit.errors import CheckpointError, ConfigError, RunError
from slmkit.model import LanguageModel, filter_logits
from slmkit.plugins import PluginManager
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.train import Trainer
from slmkit.trained import load_trained

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: short runs: no evaluation, sample or checkpoint before the last step
QUICK: dict[str, Any] = {
    "training": {"max_steps": 4, "eval_every": 0, "checkpoint_every": 0, "log_every": 1},
    "sampling": {"every": 0, "max_new_tokens": 4},
}


def changes(*tables: dict[str, Any]) -> dict[str, Any]:
    """QUICK with ``tables`` merged in, table by table."""
    out: dict[str, Any] = {k: dict(v) for k, v in QUICK.items()}
    for extra in tables:
        for table, values in extra.items():
            if isinstance(values, dict):
                out.setdefault(table, {}).update(values)
            else:
                out[table] = values
    return out


def train(
    path: Path,
    manager: PluginManager,
    runs: Path,
    overrides=(),
    resume=None,
    console: Console | None = None,
) -> tuple[Trainer, Path]:
    exp = load_experiment(path, manager, overrides)
    trainer = Trainer(exp, manager, str(path), runs_dir=runs, resume=resume,
                      console=console or Console(quiet=True))  # fmt: skip
    return trainer, Path(trainer.run()["run_dir"])


def steps(run_dir: Path) -> list[tuple[int, float, float]]:
    """``(step, train_loss, lr)`` of every train_step event."""
    return [(e["step"], e["train_loss"], e["lr"]) for e in read_events(run_dir / "log.jsonl")
            if e["event"] == "train_step"]  # fmt: skip


def losses(run_dir: Path) -> list[float]:
    return [loss for _, loss, _ in steps(run_dir)]


# -- gradient accumulation ---------------------------------------------------------------


def test_accumulation_4x4_trains_like_16x1(write_experiment, manager, tmp_path) -> None:
    # dropout 0: the two runs draw nothing random, and the stream hands out the same
    # consecutive windows (4 micro-batches of 4 = one batch of 16)
    no_dropout = {"model": {"dropout": 0.0}}
    accum = write_experiment(changes(no_dropout, {"training": {"batch_size": 4,
                             "grad_accum_steps": 4}}), "accum.toml")  # fmt: skip
    plain = write_experiment(changes(no_dropout, {"training": {"batch_size": 16}}), "plain.toml")
    trainer, a = train(accum, manager, tmp_path / "a")
    _, b = train(plain, manager, tmp_path / "b")
    assert [s for s, _, _ in steps(a)] == [1, 2, 3, 4]
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    assert checkpoint.load(a)["data"] == checkpoint.load(b)["data"] == {"windows_consumed": 64}
    assert trainer.data.stream.consumed == 64
    pa, pb = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.allclose(pa[name], pb[name], rtol=0, atol=1e-6), name
    # the model did learn: the comparison above is not between two initialisations
    assert losses(a)[-1] < losses(a)[0] - 0.1


def test_accumulation_changes_the_effective_batch(write_experiment, manager, tmp_path) -> None:
    base = {"model": {"dropout": 0.0}, "training": {"max_steps": 2, "batch_size": 4}}
    path = write_experiment(changes(base))
    _, one = train(path, manager, tmp_path / "one")
    _, two = train(path, manager, tmp_path / "two", ["training.grad_accum_steps=2"])
    # step 1 sees windows 0-3 in both; accumulation adds windows 4-7 to the same step
    assert losses(one)[0] != losses(two)[0]
    assert losses(one)[1] != losses(two)[1]
    assert checkpoint.load(one)["data"]["windows_consumed"] == 8
    assert checkpoint.load(two)["data"]["windows_consumed"] == 16


def test_resume_is_bit_exact_with_schedule_accumulation_and_bpe(
    write_experiment, manager, tmp_path
) -> None:
    interrupt = Interrupt()
    manager.add(interrupt, "interrupt")
    path = write_experiment(
        changes(
            {
                "plugins": {"enable": ["interrupt"]},
                "tokenizer": {"name": "bpe", "vocab_size": 300},
                "schedule": {"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
                "training": {"max_steps": 6, "checkpoint_every": 3, "grad_accum_steps": 2},
                "sampling": {"max_new_tokens": 2},
            }
        )
    )
    _, full = train(path, manager, tmp_path / "full")
    logged = steps(full)
    assert [s for s, _, _ in logged] == [1, 2, 3, 4, 5, 6]
    lr = load_experiment(path, manager).optimizer.learning_rate
    assert (logged[0][2], logged[1][2]) == (lr * 0.5, lr)  # warmup, then decay
    assert logged[5][2] < logged[4][2] < logged[2][2]

    interrupt.at = 3  # fail right after the checkpoint of step 3 (max_steps stays 6)
    with pytest.raises(RunError, match="interrupted at step 3"):
        train(path, manager, tmp_path / "half")
    (half,) = (tmp_path / "half").iterdir()
    assert checkpoint.load(half)["step"] == 3
    interrupt.at = None
    # what a resume may not change: the effective batch and the precision
    for override in ("training.grad_accum_steps=1", "training.precision=bf16"):
        exp = load_experiment(path, manager, [override])
        key = override.split("=")[0]
        with pytest.raises(CheckpointError, match=re.escape(key)):
            Trainer(exp, manager, str(path), resume=half, console=Console(quiet=True))
    _, resumed = train(path, manager, tmp_path / "unused", resume=half)
    assert resumed == half
    assert steps(resumed) == logged  # losses and learning rates, bit for bit
    assert_same_parameters(resumed, full)
    assert checkpoint.load(resumed)["data"] == checkpoint.load(full)["data"]
    assert checkpoint.load(resumed)["tokenizer"] == checkpoint.load(full)["tokenizer"]
    assert checkpoint.load(full)["tokenizer"]["state"]["vocab_size"] == 300
    assert checkpoint.load(full)["model"]["head.weight"].shape[0] == 300


# -- precision ---------------------------------------------------------------------------


def test_bf16_trains_on_cpu_and_keeps_fp32_weights(write_experiment, manager, tmp_path) -> None:
    path = write_experiment(changes({"training": {"max_steps": 2}}))
    _, fp32 = train(path, manager, tmp_path / "fp32")
    _, bf16 = train(path, manager, tmp_path / "bf16", ["training.precision=bf16"])
    assert all(math.isfinite(v) for v in losses(bf16))
    assert abs(losses(bf16)[0] - losses(fp32)[0]) < 0.05
    assert losses(bf16) != losses(fp32)  # autocast did take effect
    (evaluation,) = events(bf16, "eval")
    assert math.isfinite(evaluation["val_loss"])
    payload = checkpoint.load(bf16)
    assert payload["experiment"]["training"]["precision"] == "bf16"
    assert {t.dtype for t in payload["model"].values()} == {torch.float32}
    moments = [v for s in payload["optimizer"]["state"].values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0]  # fmt: skip
    assert moments and {t.dtype for t in moments} == {torch.float32}
    assert payload["grad_scaler"] == {}


def test_fp16_on_cpu_is_a_config_error_before_any_run_folder(
    write_experiment, manager, tmp_path
) -> None:
    path = write_experiment(changes({"training": {"precision": "fp16"}}))
    exp = load_experiment(path, manager)
    with pytest.raises(ConfigError) as info:
        Trainer(exp, manager, str(path), runs_dir=tmp_path / "runs", console=Console(quiet=True))
    assert info.value.key == "training.precision"
    assert str(info.value).startswith(f"{path}: training.precision: ")
    assert "CUDA" in info.value.message and "bf16" in info.value.message
    assert not (tmp_path / "runs").exists()


def test_fp16_on_cpu_through_the_cli(write_experiment, tmp_path, capsys) -> None:
    path = write_experiment(changes({"training": {"precision": "fp16"}}))
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slmkit: error: {path}: training.precision: ")
    assert err.count("\n") == 1 and err.endswith("\n")
    assert not (tmp_path / "runs").exists()


# -- compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("failing_call", [1, 2], ids=["first-step", "later-recompile"])
def test_compile_failure_falls_back_to_the_same_run(
    write_experiment, manager, tmp_path, monkeypatch, failing_call
) -> None:
    compiled: list[Any] = []
    calls: list[int] = []

    def fake_compile(model: Any, *args: Any, **kwargs: Any) -> Any:
        compiled.append(model)

        def broken(*a: Any, **k: Any) -> Any:
            calls.append(1)
            if len(calls) < failing_call:  # compiled steps that work, then a failing one
                return model(*a, **k)
            torch.rand(100)  # a failure part-way, after drawing random numbers
            raise RuntimeError("no compiler\nsecond line of the error")

        return broken

    path = write_experiment(changes({"training": {"max_steps": 3}}))  # dropout 0.1 as TINY
    _, eager = train(path, manager, tmp_path / "eager")
    monkeypatch.setattr(slmkit.stepper.torch, "compile", fake_compile)
    out = io.StringIO()
    trainer, run = train(path, manager, tmp_path / "compiled", ["training.compile=true"],
                         console=Console(out))  # fmt: skip
    assert compiled == [trainer.model]
    assert trainer.stepper.compiled is None
    assert len(calls) == failing_call  # never tried again
    (failed,) = events(run, "compile_failed")
    assert failed["error"] == "no compiler"
    assert out.getvalue().count("torch.compile") == 1
    assert "warning: torch.compile failed, training uncompiled: no compiler\n" in out.getvalue()
    assert steps(run) == steps(eager)  # bit for bit: the draws of the failed pass are undone
    assert_same_parameters(run, eager)


def test_compile_that_works_is_used(write_experiment, manager, tmp_path, monkeypatch) -> None:
    calls: list[int] = []

    def fake_compile(model: Any, *args: Any, **kwargs: Any) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            calls.append(1)
            return model(*a, **k)

        return wrapped

    path = write_experiment(changes({"training": {"max_steps": 2}}))
    _, eager = train(path, manager, tmp_path / "eager")
    monkeypatch.setattr(slmkit.stepper.torch, "compile", fake_compile)
    _, run = train(path, manager, tmp_path / "compiled", ["training.compile=true"])
    assert len(calls) == 2  # one forward per step goes through the compiled callable
    assert events(run, "compile_failed") == []
    assert steps(run) == steps(eager)


@pytest.mark.slow
def test_real_compile_matches_eager(write_experiment, manager, tmp_path) -> None:
    # dropout 0: nothing random
    path = write_experiment(changes({"model": {"dropout": 0.0}, "training": {"max_steps": 3}}))
    _, eager = train(path, manager, tmp_path / "eager")
    _, run = train(path, manager, tmp_path / "compiled", ["training.compile=true"])
    if events(run, "compile_failed"):
        pytest.skip(f"torch.compile unavailable here: {events(run, 'compile_failed')[0]}")
    assert losses(run) == pytest.approx(losses(eager), abs=1e-4)


def compiled_graphs() -> int:
    """Graphs torch.compile has captured in this process so far (each compile, each recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "rel"), [("fp32", 1e-5), ("bf16", 2e-3)])
def test_compiled_training_matches_eager_for_5_steps_with_dropout(
    write_experiment, manager, tmp_path, precision, rel
) -> None:
    # TINY's dropout 0.1: the compiled step draws the same masks as the eager one
    overrides = [f"training.precision={precision}"]
    path = write_experiment(changes({"training": {"max_steps": 5}}))
    _, eager = train(path, manager, tmp_path / "eager", overrides)
    graphs = compiled_graphs()
    trainer, run = train(
        path, manager, tmp_path / "compiled", [*overrides, "training.compile=true"]
    )
    if events(run, "compile_failed"):
        pytest.skip(f"torch.compile unavailable here: {events(run, 'compile_failed')[0]}")
    assert trainer.stepper.compiled is not None
    assert compiled_graphs() == graphs + 1  # one graph, never compiled again
    assert len(losses(run)) == 5
    assert losses(run) == pytest.approx(losses(eager), rel=rel)
    assert losses(run) != losses(eager)  # really compiled: the last bits differ
    eager_weights = checkpoint.load(eager)["model"]
    for name, weight in checkpoint.load(run)["model"].items():
        torch.testing.assert_close(weight, eager_weights[name], rtol=100 * rel, atol=100 * rel)


@pytest.mark.slow
def test_forward_hooks_watch_compiled_training_from_eager_steps(
    write_experiment, manager, tmp_path
) -> None:
    tables = {"forward_hooks": [{"name": "activation_stats", "every": 2},
                                {"name": "attention_entropy", "every": 3}]}  # fmt: skip
    path = write_experiment(changes({"training": {"max_steps": 5}}, tables))
    _, eager = train(path, manager, tmp_path / "eager")
    graphs = compiled_graphs()
    _, run = train(path, manager, tmp_path / "compiled", ["training.compile=true"])
    if events(run, "compile_failed"):
        pytest.skip(f"torch.compile unavailable here: {events(run, 'compile_failed')[0]}")
    assert compiled_graphs() <= graphs + 1  # watched steps run eager: no recompile
    assert losses(run) == pytest.approx(losses(eager), rel=1e-5)
    watched = [(e["step"], e["name"]) for e in events(run, "forward_hook")]
    assert watched == [(2, "activation_stats"), (3, "attention_entropy"),
                       (4, "activation_stats")]  # fmt: skip
    assert watched == [(e["step"], e["name"]) for e in events(eager, "forward_hook")]
    for got, want in zip(events(run, "forward_hook"), events(eager, "forward_hook"), strict=True):
        assert got["metrics"].keys() == want["metrics"].keys()
        for point, values in got["metrics"].items():
            assert values == pytest.approx(want["metrics"][point], rel=1e-4, abs=1e-6)


class ItemBlock(torch.nn.Module):
    """A block that reads a tensor's value in Python: torch.compile cannot make it one graph."""

    def __init__(self, options: Any, dims: slmkit.ModelDims, layer: int) -> None:
        super().__init__()
        self.mix = torch.nn.Linear(dims.d_model, dims.d_model)

    def forward(self, x: torch.Tensor, ctx: slmkit.BlockContext) -> torch.Tensor:
        if x.abs().max().item() > 1e30:  # never: the same computation either way
            x = x / 2
        return x + self.mix(x)


class ItemBlockPlugin:
    @slmkit.hookimpl
    def register_blocks(self, register: slmkit.Register) -> None:
        register("item", ItemBlock)


def test_a_block_that_cannot_be_compiled_trains_eager_and_says_so_once(
    write_experiment, tmp_path
) -> None:
    manager = PluginManager(entry_points=False).load()
    manager.add(ItemBlockPlugin(), "item-blocks")
    base = {"plugins": {"enable": ["item-blocks"]}, "model": {"block": "item"}}
    path = write_experiment(changes(base, {"training": {"max_steps": 3}}))
    _, eager = train(path, manager, tmp_path / "eager")
    out = io.StringIO()
    trainer, run = train(path, manager, tmp_path / "compiled", ["training.compile=true"],
                         console=Console(out))  # fmt: skip
    assert trainer.stepper.compiled is None
    (failed,) = events(run, "compile_failed")
    assert failed["error"].startswith(
        f"the model is not one graph at {Path(__file__).name}:{ITEM_LINE}: Consider annotating "
        "your code using torch._check*(). Could not guard on data-dependent expression"
    )
    warnings = [ln for ln in out.getvalue().splitlines() if "torch.compile" in ln]
    assert warnings == [f"warning: torch.compile failed, training uncompiled: {failed['error']}"]
    assert steps(run) == steps(eager)  # bit for bit: the failed trace drew no random numbers
    assert_same_parameters(run, eager)


ITEM_LINE = ItemBlock.forward.__code__.co_firstlineno + 1  # the .item() line


# -- tied embeddings ---------------------------------------------------------------------


def tiny_exp(manager: PluginManager, **model: Any) -> Any:
    return experiment_from_dict(merge(TINY, {"model": model}), manager, "x.toml")


def test_tied_embeddings_share_one_matrix(manager) -> None:
    sizes = {}
    for tied in (False, True):
        exp = tiny_exp(manager, tie_embeddings=tied)
        tokenizer = build_tokenizer(exp)
        tokenizer.train("abcdefghij klmnop\n")
        torch.manual_seed(0)
        model = build_model(exp, tokenizer)
        assert (model.head.weight is model.tok_emb.weight) is tied
        sizes[tied] = (model.n_params, tokenizer.vocab_size)
        # a tied matrix is an embedding: it is in the no-decay group, once
        groups = model.param_groups(1e-3)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
        no_decay = {id(p) for p in groups[1]["params"]}
        assert id(model.tok_emb.weight) in no_decay
        assert (id(model.head.weight) in no_decay) is tied
    vocab = sizes[True][1]
    assert sizes[False][0] - sizes[True][0] == vocab * 32  # vocab_size x d_model


def test_validate_counts_tied_parameters_once(write_experiment, capsys) -> None:
    counts = {}
    for tied in (False, True):
        path = write_experiment({"tokenizer": {"name": "bpe", "vocab_size": 300},
                                 "model": {"tie_embeddings": tied}}, f"t{tied}.toml")  # fmt: skip
        assert main(["validate", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"tie_embeddings = {str(tied).lower()}" in out
        (count,) = re.findall(r"^# parameters: [\d,]+ \((\d+)\)$", out, re.MULTILINE)
        counts[tied] = int(count)
    assert counts[False] - counts[True] == 300 * 32


@pytest.fixture
def tied_runs(write_experiment, manager, tmp_path) -> dict[str, Any]:
    """A tied 6-step run, and the same run stopped at step 3 and resumed."""
    tied = {"model": {"tie_embeddings": True}}
    path = write_experiment(changes(tied, {"training": {"max_steps": 6, "checkpoint_every": 3}}))
    trainer, full = train(path, manager, tmp_path / "full")
    _, half = train(path, manager, tmp_path / "half", ["training.max_steps=3"])
    resumed_trainer, resumed = train(path, manager, tmp_path / "unused", resume=half)
    return {"trainer": trainer, "full": full, "resumed_trainer": resumed_trainer,
            "resumed": resumed}  # fmt: skip


def test_tied_run_resumes_bit_exactly(tied_runs) -> None:
    full, resumed = tied_runs["full"], tied_runs["resumed"]
    assert [s for s, _, _ in steps(resumed)] == [1, 2, 3, 4, 5, 6]
    assert steps(resumed) == steps(full)
    assert_same_parameters(resumed, full)
    model = tied_runs["resumed_trainer"].model
    assert model.head.weight is model.tok_emb.weight  # loading the state kept the tie
    saved = checkpoint.load(full)["model"]
    assert torch.equal(saved["head.weight"], saved["tok_emb.weight"])
    (start, *_) = events(full, "run_start")
    assert start["n_params"] == tied_runs["trainer"].model.n_params
    # the tied table is left out once: the blocks and the final norm remain, as untied
    n_embedding = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    assert start["non_embedding_params"] == start["n_params"] - n_embedding


def test_tied_checkpoint_loads_with_the_same_logits(tied_runs, manager) -> None:
    trained = load_trained(tied_runs["full"], manager, "cpu")
    model = tied_runs["trainer"].model.eval()
    x = torch.randint(0, model.dims.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained.model(x)[0], model(x)[0])
    assert torch.equal(trained.model.head.weight, trained.model.tok_emb.weight)


def test_tied_checkpoint_loads_still_tied(tied_runs, manager) -> None:
    trained = load_trained(tied_runs["full"], manager, "cpu")
    assert trained.model.head.weight is trained.model.tok_emb.weight
    assert trained.model.n_params == tied_runs["trainer"].model.n_params


# -- filter_logits -----------------------------------------------------------------------

PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]


def kept(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> set:
    out = filter_logits(logits, top_k, top_p)
    assert out.shape == logits.shape
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], logits[finite])  # kept logits are untouched
    return set(finite.nonzero().flatten().tolist())


@pytest.mark.parametrize(
    ("top_k", "top_p", "expected"),
    [
        (None, None, {0, 1, 2, 3, 4}),
        (1, None, {0}),
        (2, None, {0, 1}),
        (3, None, {0, 1, 2}),
        (5, None, {0, 1, 2, 3, 4}),
        (50, None, {0, 1, 2, 3, 4}),  # more than the vocabulary: no limit
        (None, 1e-6, {0}),  # the most likely token always stays
        (None, 0.3, {0}),
        (None, 0.5, {0}),  # {0} already reaches 0.5
        (None, 0.6, {0, 1}),  # 0.5 < 0.6 <= 0.7
        (None, 0.7, {0, 1}),
        (None, 0.75, {0, 1, 2}),  # 0.7 < 0.75 <= 0.85
        (None, 0.85, {0, 1, 2}),
        (None, 0.9, {0, 1, 2, 3}),  # 0.85 < 0.9 <= 0.95
        (None, 0.96, {0, 1, 2, 3, 4}),
        (None, 1.0, {0, 1, 2, 3, 4}),
        (3, 0.6, {0, 1}),  # top 3 renormalised: 0.588, 0.235, 0.176
        (3, 0.9, {0, 1, 2}),
        # top_k first, then top_p on what is left, renormalised (docs/experiments.md:
        # "then top_k, then top_p"): 0.5 / 0.7 = 0.714 already reaches 0.65
        (2, 0.65, {0}),
        (1, 1.0, {0}),
    ],
)  # fmt: skip
def test_filter_logits_keeps_exact_sets(top_k, top_p, expected) -> None:
    logits = torch.tensor(PROBS).log()
    assert kept(logits, top_k, top_p) == expected
    # the order of the vocabulary does not matter
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert kept(logits[perm], top_k, top_p) == {i for i, j in enumerate(perm.tolist())
                                                if j in expected}  # fmt: skip
    # nor does a shift of every logit (the same distribution)
    assert kept(logits + 3.0, top_k, top_p) == expected


@pytest.mark.parametrize(("top_p", "expected"), [(0.5, {0}), (0.85, {0, 1, 2})])
def test_filter_logits_exact_threshold_in_float64(top_p, expected) -> None:
    logits = torch.tensor(PROBS, dtype=torch.float64).log()
    assert logits.softmax(-1).cumsum(-1).tolist()[:3] == [0.5, 0.7, 0.85]
    assert kept(logits, None, top_p) == expected


def test_filter_logits_ties() -> None:
    # every logit equal to the k-th largest stays
    assert kept(torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0]), top_k=2) == {0, 1, 2, 3}
    assert kept(torch.tensor([1.0, 1.0, 1.0, 1.0]), top_k=3) == {0, 1, 2, 3}
    # nucleus over equal probabilities (0.25 each): how many, whichever they are
    uniform = torch.zeros(4)
    assert len(kept(uniform, top_p=0.5)) == 2
    assert len(kept(uniform, top_p=0.51)) == 3
    assert len(kept(uniform, top_p=0.2)) == 1
    assert len(kept(uniform, top_p=1.0)) == 4


def test_filter_logits_rows_are_independent() -> None:
    base = torch.tensor(PROBS).log()
    rows = torch.stack([base, base.flip(0), torch.zeros(5), torch.tensor([9.0, 0, 0, 0, 0])])
    for top_k, top_p in ((2, None), (None, 0.6), (3, 0.6), (None, 0.9)):
        together = filter_logits(rows, top_k, top_p)
        for i, row in enumerate(rows):
            assert torch.equal(together[i], filter_logits(row, top_k, top_p)), (i, top_k, top_p)
    # and in (batch, time, vocab) too
    cube = rows.view(2, 2, 5)
    assert torch.equal(filter_logits(cube, None, 0.6), filter_logits(rows, None, 0.6).view(2, 2, 5))
    assert kept(rows[1], None, 0.6) == {4, 3}


# -- generate with top_k / top_p ---------------------------------------------------------


def tiny_model(vocab: int = 11, seed: int = 0) -> LanguageModel:
    manager = PluginManager(entry_points=False).load()
    exp = tiny_exp(manager)
    dims = ModelDims(n_layers=2, d_model=32, n_heads=2, d_ff=64, dropout=0.0,
                     context_length=16, vocab_size=vocab)  # fmt: skip
    factory = manager.component("block", "gpt", exp.participants).factory
    torch.manual_seed(seed)
    model = LanguageModel(dims, lambda layer: factory(exp.model.options, dims, layer))
    with torch.no_grad():  # larger weights: logits far from uniform
        model.head.weight.mul_(50)
    return model.eval()


@torch.no_grad()
def greedy(model: LanguageModel, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = prompt
    for _ in range(n):
        logits, _ = model(out[:, -model.dims.context_length :])
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_top_k_1_is_greedy_for_any_seed(use_cache: bool) -> None:
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3], [4, 4, 4]])
    # without the cache, past the context of 16 too; with it, up to a full context (a
    # full cache restarts from 3/4 of the window, which the reference does not do)
    n = 13 if use_cache else 20
    expected = greedy(model, prompt, n)
    for seed in range(4):
        for temperature in (0.5, 1.0, 3.0):
            generator = torch.Generator().manual_seed(seed)
            out = model.generate(prompt, n, temperature=temperature, top_k=1,
                                 generator=generator, use_cache=use_cache)  # fmt: skip
            assert torch.equal(out, expected), (seed, temperature)
    # without top_k the seed matters (the comparison above is not vacuous)
    draws = {tuple(model.generate(prompt, 20, temperature=3.0,
                                  generator=torch.Generator().manual_seed(s))[0].tolist())
             for s in range(4)}  # fmt: skip
    assert len(draws) > 1


class FixedLogits:
    """Stands in for LanguageModel.forward: the same next-token logits everywhere."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, idx: torch.Tensor, targets=None, caches=None):
        return self.logits.expand(idx.shape[0], idx.shape[1], -1).clone(), None


def controlled_model(monkeypatch, probs: list[float]) -> LanguageModel:
    model = tiny_model(vocab=len(probs))
    monkeypatch.setattr(model, "forward", FixedLogits(torch.tensor(probs).log()))
    return model


def draws(model: LanguageModel, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    prompt = torch.zeros(400, 1, dtype=torch.long)  # 400 rows x 5 tokens = 2000 draws
    generator = torch.Generator().manual_seed(seed)
    return model.generate(prompt, 5, generator=generator, use_cache=False, **kwargs)[:, 1:]


def test_generate_top_k_and_top_p_never_leave_the_allowed_tokens(monkeypatch) -> None:
    model = controlled_model(monkeypatch, [0.1, 0.3, 0.05, 0.25, 0.2, 0.1])
    assert set(draws(model).unique().tolist()) == set(range(6))  # unfiltered: everything
    assert set(draws(model, top_k=2).unique().tolist()) == {1, 3}
    assert set(draws(model, top_k=3).unique().tolist()) == {1, 3, 4}
    assert set(draws(model, top_p=0.5).unique().tolist()) == {1, 3}  # 0.3 + 0.25
    assert set(draws(model, top_p=0.9).unique().tolist()) == {0, 1, 3, 4, 5}  # 0.85 < 0.9
    assert set(draws(model, top_k=4).unique().tolist()) == {0, 1, 3, 4, 5}  # a tie at 0.1
    assert set(draws(model, top_k=1, top_p=0.9).unique().tolist()) == {1}
    # the allowed tokens keep their relative odds: 0.3 : 0.25 over 2000 draws
    share = (draws(model, top_k=2) == 1).double().mean().item()
    assert share == pytest.approx(0.3 / 0.55, abs=0.04)
    assert torch.equal(draws(model, seed=3, top_p=0.5), draws(model, seed=3, top_p=0.5))


def test_generate_applies_temperature_before_top_p(monkeypatch) -> None:
    model = controlled_model(monkeypatch, PROBS)
    # temperature 1: top_p 0.6 keeps {0, 1}
    assert set(draws(model, temperature=1.0, top_p=0.6).unique().tolist()) == {0, 1}
    # temperature 0.5 squares the odds first: token 0 alone has 0.25 / 0.325 = 0.77
    assert set(draws(model, temperature=0.5, top_p=0.6).unique().tolist()) == {0}
    # temperature 2 flattens them: 0.5 is no longer enough with two tokens
    assert set(draws(model, temperature=2.0, top_p=0.6).unique().tolist()) == {0, 1, 2}


# -- the command line and [sampling] -------------------------------------------------------


def test_sample_command_top_k_and_top_p(write_experiment, tmp_path, capsys) -> None:
    path = write_experiment(changes({"training": {"max_steps": 2}}))
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()

    def sample(*args: str) -> str:
        assert main(["sample", str(run_dir), "--max-new-tokens", "30", *args]) == 0
        return capsys.readouterr().out

    greedy_1, greedy_2 = (
        sample("--top-k", "1", "--seed", "1"),
        sample("--top-k", "1", "--seed", "2"),
    )
    assert greedy_1 == greedy_2
    assert sample("--top-k", "1", "--seed", "3", "--temperature", "5") == greedy_1
    assert sample("--seed", "1", "--temperature", "5") != sample(
        "--seed", "2", "--temperature", "5"
    )
    nucleus = sample("--top-k", "5", "--top-p", "0.9", "--seed", "4")
    assert nucleus == sample("--top-k", "5", "--top-p", "0.9", "--seed", "4")
    assert len(nucleus) == 1 + 30 + 1  # the "\n" prompt, 30 characters, a newline

    for args, message in (
        (["--top-p", "0"], "--top-p: must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
        (["--top-p", "-0.2"], "--top-p: must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k: must be >= 0"),
    ):
        assert main(["sample", str(run_dir), *args]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"slmkit: error: {message}\n"
        assert captured.out == ""


def test_sampling_top_k_top_p_in_an_experiment(write_experiment, manager, tmp_path) -> None:
    path = write_experiment(changes({"training": {"max_steps": 2},
                                     "sampling": {"every": 1, "top_k": 5, "top_p": 0.9,
                                                  "max_new_tokens": 12}}))  # fmt: skip
    _, a = train(path, manager, tmp_path / "a")
    _, b = train(path, manager, tmp_path / "b")
    samples_a, samples_b = events(a, "sample"), events(b, "sample")
    assert [e["step"] for e in samples_a] == [1, 2]
    assert [e["sample_text"] for e in samples_a] == [e["sample_text"] for e in samples_b]
    assert all(len(e["sample_text"]) == 12 for e in samples_a)
    resolved = load_experiment(a / "experiment.toml", manager)
    assert (resolved.sampling.top_k, resolved.sampling.top_p) == (5, 0.9)


# -- validation of the new keys ----------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "key", "value", "message"),
    [
        ("training", "grad_accum_steps", 0, "must be > 0, got 0"),
        ("training", "grad_accum_steps", -2, "must be > 0"),
        ("training", "grad_accum_steps", 2.0, "expected an integer"),
        ("training", "grad_accum_steps", "2", "expected an integer"),
        ("training", "precision", "fp8", "must be one of"),
        ("training", "precision", "BF16", "must be one of"),
        ("training", "compile", "yes", "expected true or false"),
        ("training", "compile", 1, "expected true or false"),
        ("sampling", "top_p", 1.5, "must be in (0, 1]"),
        ("sampling", "top_p", 0, "must be in (0, 1]"),
        ("sampling", "top_p", -0.5, "must be in (0, 1]"),
        ("sampling", "top_p", "0.9", "expected a number"),
        ("sampling", "top_k", -1, "must be >= 0"),
        ("sampling", "top_k", 2.5, "expected an integer"),
        ("model", "tie_embeddings", "yes", "expected true or false"),
        ("model", "tie_embeddings", 1, "expected true or false"),
    ],
)  # fmt: skip
def test_new_keys_are_validated(manager, table, key, value, message) -> None:
    with pytest.raises(ConfigError) as info:
        experiment_from_dict({table: {key: value}}, manager, "experiments/x.toml")
    assert info.value.key == f"{table}.{key}"
    assert str(info.value).startswith(f"experiments/x.toml: {table}.{key}: ")
    assert message in info.value.message


def test_new_keys_defaults_and_valid_values(manager) -> None:
    exp = experiment_from_dict({}, manager, "x.toml")
    assert (exp.training.grad_accum_steps, exp.training.precision, exp.training.compile) == (
        1, "auto", False,
    )  # fmt: skip
    assert (exp.sampling.top_k, exp.sampling.top_p, exp.model.tie_embeddings) == (0, 1.0, False)
    exp = experiment_from_dict(
        {"training": {"grad_accum_steps": 8, "precision": "fp16", "compile": True},
         "sampling": {"top_k": 40, "top_p": 1}, "model": {"tie_embeddings": True}},
        manager, "x.toml",
    )  # fmt: skip
    assert exp.sampling.top_p == 1.0 and isinstance(exp.sampling.top_p, float)
    assert exp.to_dict()["training"]["grad_accum_steps"] == 8
    assert exp.to_dict()["model"]["tie_embeddings"] is True
