"""The built-in ``muon`` optimizer: its split, its schedule, its options, its exact resume."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest
import torch
from conftest import ROOT, Interrupt, assert_same_parameters, events, losses, train
from slmkit_builtin.muon import MuonAdamW, MuonOptions

from slmkit import checkpoint
from slmkit.cli import main
from slmkit.config.resolve import load_experiment
from slmkit.errors import RunError
from slmkit.progress import Console
from slmkit.train import Trainer

MUON = {"optimizer": {"name": "muon", "learning_rate": 0.02, "adamw_lr": 3e-3}}

#: the tiny gpt model's block matrices: what Muon updates
HIDDEN = [
    f"blocks.{layer}.{matrix}.weight"
    for layer in (0, 1)
    for matrix in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
]


def with_muon(**tables: dict) -> dict:
    """MUON's [optimizer] with more keys, and other tables."""
    optimizer = {**MUON["optimizer"], **tables.pop("optimizer", {})}
    return {"optimizer": optimizer, **tables}


def trainer_of(path: Path, manager, overrides=()) -> Trainer:
    exp = load_experiment(path, manager, overrides)
    return Trainer(exp, manager, str(path), runs_dir=path.parent / "runs",
                   console=Console(quiet=True))  # fmt: skip


@pytest.mark.parametrize("tied", [False, True])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(write_experiment, manager, tied) -> None:
    path = write_experiment(with_muon(model={"tie_embeddings": tied},
                                      optimizer={"weight_decay": 0.05}))  # fmt: skip
    trainer = trainer_of(path, manager)
    optimizer, model = trainer.optimizer, trainer.model
    assert isinstance(optimizer, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    assert groups[0] == HIDDEN
    head = [] if tied else ["head.weight"]  # tied: the embedding table, not decayed
    assert groups[1] == head
    assert groups[2] == [n for n in names.values() if n not in HIDDEN + head]
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight"} <= set(groups[2])
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 3e-3, 3e-3]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.1, 0.0]
    muon = optimizer.param_groups[0]
    assert (muon["momentum"], muon["nesterov"], muon["ns_steps"]) == (0.95, True, 5)
    assert optimizer.param_groups[1]["betas"] == (0.9, 0.95)
    # the inner optimizers work on these very groups and this one state
    assert optimizer.muon.param_groups[0] is muon
    assert optimizer.muon.state is optimizer.adamw.state is optimizer.state


def test_both_parts_follow_the_schedule_from_their_own_rates(write_experiment, manager) -> None:
    path = write_experiment(with_muon(schedule={"name": "cosine", "warmup_steps": 2}))
    trainer = trainer_of(path, manager)
    factor = trainer.schedule(4)
    assert 0 < factor < 1
    assert trainer.stepper.set_lr(4) == 0.02 * factor  # the logged lr is Muon's
    rates = [g["lr"] for g in trainer.optimizer.param_groups]
    assert rates == [0.02 * factor, 3e-3 * factor, 3e-3 * factor]
    assert trainer.optimizer.muon.param_groups[0]["lr"] == 0.02 * factor
    assert trainer.optimizer.adamw.param_groups[1]["lr"] == 3e-3 * factor


def test_muon_trains_every_parameter(write_experiment, manager, tmp_path) -> None:
    path = write_experiment(with_muon(training={"max_steps": 12, "checkpoint_every": 0}))
    trainer = trainer_of(path, manager)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    run_dir = Path(trainer.run()["run_dir"])
    after = dict(trainer.model.named_parameters())
    assert [n for n in before if torch.equal(before[n], after[n])] == []
    curve = [loss for _, loss in losses(run_dir)]
    assert curve[-1] < curve[0] - 0.5
    state = trainer.optimizer.state
    assert set(state[after[HIDDEN[0]]]) == {"momentum_buffer"}
    assert set(state[after["tok_emb.weight"]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_a_muon_run_stopped_and_resumed_is_bit_exact(write_experiment, manager, tmp_path) -> None:
    interrupt = Interrupt()  # fails the run right after the checkpoint of step 4
    manager.add(interrupt, "interrupt")
    path = write_experiment(with_muon(
        training={"max_steps": 8, "checkpoint_every": 2},
        schedule={"name": "cosine", "warmup_steps": 2},
        update_hooks=[{"name": "clip_grad_norm", "max_norm": 0.5}],
        plugins={"enable": ["interrupt"]},
    ))  # fmt: skip
    full = train(path, tmp_path / "full", manager)
    interrupt.at = 4
    with pytest.raises(RunError, match="interrupted at step 4"):
        train(path, tmp_path / "half", manager)
    (half,) = (tmp_path / "half").iterdir()
    interrupt.at = None
    resumed = train(path, tmp_path / "unused", manager, resume=half)
    assert resumed == half
    assert [s for s, _ in losses(full)] == list(range(1, 9))
    assert losses(resumed) == losses(full)
    rates = [[e["lr"] for e in events(run, "train_step")] for run in (full, resumed)]
    assert rates[0] == rates[1] and len(set(rates[0])) > 4  # the cosine curve, bit for bit
    assert_same_parameters(resumed, full)
    full_opt, resumed_opt = checkpoint.load(full)["optimizer"], checkpoint.load(half)["optimizer"]
    assert full_opt["param_groups"] == resumed_opt["param_groups"]
    assert full_opt["state"].keys() == resumed_opt["state"].keys()
    for key, state in full_opt["state"].items():
        assert state.keys() == resumed_opt["state"][key].keys()
        for name, value in state.items():
            assert torch.equal(value, resumed_opt["state"][key][name]), (key, name)


def test_a_skipped_update_puts_back_both_parts(write_experiment, manager) -> None:
    path = write_experiment(with_muon(training={"on_nonfinite": "skip"}))
    trainer = trainer_of(path, manager)
    optimizer, model = trainer.optimizer, trainer.model
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # state in both parts
    saved = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    weights = [p.detach().clone() for p in model.parameters()]
    undo = trainer.stepper.undo
    assert undo is not None
    undo.save()
    optimizer.step()
    undo.restore()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert optimizer.state.keys() == saved.keys()
    for p, state in saved.items():
        assert all(torch.equal(v, optimizer.state[p][k]) for k, v in state.items())
    assert optimizer.muon.state is optimizer.state  # still one state after the undo


KEYS = (
    "name, learning_rate, momentum, nesterov, ns_steps, weight_decay, adjust_lr, "
    "adamw_lr, adamw_betas, adamw_weight_decay, adamw_eps"
)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("momentum=1.0", "momentum: must be in [0, 1), got 1.0"),
        ("ns_steps=0", "ns_steps: must be in [1, 99], got 0"),
        ("ns_steps=2.5", "ns_steps: expected an integer, got float 2.5"),
        ("nesterov=1", "nesterov: expected true or false, got integer 1"),
        ("weight_decay=-0.1", "weight_decay: must be >= 0, got -0.1"),
        ("adamw_lr=0", "adamw_lr: must be > 0, got 0.0"),
        ("adamw_betas=[0.9]", "adamw_betas: expected two numbers [beta1, beta2], got [0.9]"),
        ("adamw_weight_decay=-1", "adamw_weight_decay: must be >= 0, got -1.0"),
        ("adamw_eps=0", "adamw_eps: must be > 0, got 0.0"),
        ("adjust_lr=spectral",
         "adjust_lr: must be one of 'original', 'match_rms_adamw', got 'spectral'"),
        ("lr=0.02", f"lr: unknown key; expected one of: {KEYS}"),  # the rate: learning_rate
    ],
)  # fmt: skip
def test_bad_options_are_one_line_naming_the_key(
    write_experiment, capsys, setting, message
) -> None:
    path = write_experiment(MUON)
    assert main(["validate", str(path), "--set", f"optimizer.{setting}"]) == 2
    assert capsys.readouterr().err == f"slmkit: error: {path}: optimizer.{message}\n"


def test_every_option_is_documented() -> None:
    text = (ROOT / "docs" / "experiments.md").read_text(encoding="utf-8")
    paragraph = text[text.index("`muon` options:") :].split("\n\n")[0]
    documented = set(re.findall(r"`(\w+)` \(", paragraph))
    assert documented == {field.name for field in attrs.fields(MuonOptions)}
    module = (ROOT / "plugins" / "slmkit_builtin" / "muon.py").read_text(encoding="utf-8")
    assert all(f"    {field.name}: " in module for field in attrs.fields(MuonOptions))


def test_the_example_experiment_is_quick_with_muon(manager) -> None:
    quick = load_experiment(ROOT / "experiments" / "quick.toml", manager).to_dict()
    muon = load_experiment(ROOT / "experiments" / "muon.toml", manager).to_dict()
    assert muon["optimizer"]["name"] == "muon"
    for table in ("data", "tokenizer", "model", "schedule", "training"):
        assert muon[table] == quick[table], table
