"""Tests of the ``sgd_momentum`` optimizer plugin.

Run them with the plugin installed (``uv pip install -e plugins/slmkit-sgd-momentum``)::

    uv run pytest plugins/slmkit-sgd-momentum/tests

The hand-computed cases use learning rates, momenta and gradients that are exact in binary
floating point, so the expected values are compared exactly, not approximately.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import slmkit.testing
import torch
from slmkit import OptionValueError

from slmkit_sgd_momentum import (
    NAME,
    SGDMomentum,
    SGDMomentumOptions,
    build_sgd_momentum,
)

P0 = [1.0, -2.0]
G1 = [1.0, 2.0]
G2 = [0.5, -1.0]


def exact(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=0, atol=0)


def two_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[list[float]]:
    """Apply gradients G1 then G2 to every parameter; the values after each step."""
    after = []
    for grad in (G1, G2):
        for p in params:
            p.grad = torch.tensor(grad)
        optimizer.step()
        after.append(params[0].detach().clone().tolist())
    return after


def kernel_groups(lr: float, *params: tuple[torch.Tensor, bool]) -> list[dict[str, Any]]:
    """Parameter groups shaped like the kernel's: params, lr, decay."""
    return [{"params": [p], "lr": lr, "decay": decay} for p, decay in params]


def test_heavy_ball_two_steps_by_hand() -> None:
    # lr = mu = 0.5
    # Step 1: v = [1, 2];                        p = [1, -2] - 0.5 [1, 2] = [0.5, -3]
    # Step 2: v = 0.5 [1, 2] + [0.5, -1] = [1, 0]; p = [0.5, -3] - 0.5 [1, 0] = [0, -3]
    p = torch.tensor(P0, requires_grad=True)
    opt = build_sgd_momentum(SGDMomentumOptions(momentum=0.5), kernel_groups(0.5, (p, True)))
    step1, step2 = two_steps(opt, [p])
    assert step1 == [0.5, -3.0]
    assert step2 == [0.0, -3.0]
    exact(opt.state[p]["momentum_buffer"], [1.0, 0.0])


def test_nesterov_two_steps_by_hand() -> None:
    # Step 1: v = [1, 2]; p = [1, -2] - 0.5 ([1, 2] + 0.5 [1, 2]) = [0.25, -3.5]
    # Step 2: v = [1, 0]; p = [0.25, -3.5] - 0.5 ([0.5, -1] + 0.5 [1, 0]) = [-0.25, -3]
    p = torch.tensor(P0, requires_grad=True)
    options = SGDMomentumOptions(momentum=0.5, nesterov=True)
    opt = build_sgd_momentum(options, kernel_groups(0.5, (p, True)))
    step1, step2 = two_steps(opt, [p])
    assert step1 == [0.25, -3.5]
    assert step2 == [-0.25, -3.0]


def test_zero_momentum_is_plain_sgd() -> None:
    p = torch.tensor(P0, requires_grad=True)
    opt = build_sgd_momentum(SGDMomentumOptions(momentum=0.0), kernel_groups(0.5, (p, True)))
    step1, step2 = two_steps(opt, [p])
    assert step1 == [0.5, -3.0]
    assert step2 == [0.25, -2.5]


def test_weight_decay_only_on_decay_groups() -> None:
    # wd = 0.5, lr = 0.5: decay groups shrink by lr * wd = 0.25 before the momentum step.
    # Step 1: p = 0.75 [1, -2] - 0.5 [1, 2] = [0.25, -2.5]
    # Step 2: p = 0.75 [0.25, -2.5] - 0.5 [1, 0] = [-0.3125, -1.875]
    decayed = torch.tensor(P0, requires_grad=True)
    plain = torch.tensor(P0, requires_grad=True)
    options = SGDMomentumOptions(momentum=0.5, weight_decay=0.5)
    opt = build_sgd_momentum(options, kernel_groups(0.5, (decayed, True), (plain, False)))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    two_steps(opt, [decayed, plain])
    exact(decayed.detach(), [-0.3125, -1.875])
    exact(plain.detach(), [0.0, -3.0])  # the heavy-ball result: no decay at all
    # decoupled: the decay never enters the velocity
    exact(opt.state[decayed]["momentum_buffer"], [1.0, 0.0])


def test_parameters_without_gradient_are_untouched() -> None:
    p = torch.tensor(P0, requires_grad=True)
    opt = SGDMomentum([p], lr=0.5, weight_decay=0.5)
    opt.step()
    exact(p.detach(), P0)
    assert p not in opt.state


def _tiny_problem(seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    return model, x, y


def _groups(model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": decay, "lr": lr, "decay": True},
        {"params": rest, "lr": lr, "decay": False},
    ]


def _train(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int
) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("nesterov", [False, True])
def test_state_dict_round_trip_continues_identically(nesterov: bool) -> None:
    options = SGDMomentumOptions(momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    model, x, y = _tiny_problem(0)
    opt = build_sgd_momentum(options, _groups(model, 0.05))
    _train(model, opt, x, y, 3)

    # save as slmkit's checkpoints do (torch.save, loaded back with weights_only=True)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model, _, _ = _tiny_problem(1)  # different weights, overwritten below
    resumed_model.load_state_dict(saved["model"])
    resumed = build_sgd_momentum(options, _groups(resumed_model, 0.05))
    resumed.load_state_dict(saved["optimizer"])

    expected = _train(model, opt, x, y, 4)
    got = _train(resumed_model, resumed, x, y, 4)
    assert got == expected
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert expected[-1] < expected[0]  # it does optimise


@pytest.mark.parametrize(
    ("field", "value"),
    [("momentum", 1.0), ("momentum", -0.1), ("weight_decay", -1e-3), ("nesterov", 1)],
)
def test_options_are_validated(field: str, value: Any) -> None:
    with pytest.raises(OptionValueError) as info:
        SGDMomentumOptions(**{field: value})
    assert info.value.key == field


def test_registers_the_optimizer_through_the_hook() -> None:
    import slmkit_sgd_momentum

    info = slmkit.testing.load_plugin(slmkit_sgd_momentum, "slmkit-sgd-momentum", version="0.1.0")
    assert info.error is None
    assert info.provides == {"optimizer": [NAME]}
    component = info.component("optimizer", NAME)
    assert component.options is SGDMomentumOptions
    assert component.factory is build_sgd_momentum


def test_a_tiny_run_trains_with_it_and_checkpoints_its_momentum(tmp_path: Path) -> None:
    import slmkit_sgd_momentum

    run = slmkit.testing.train_tiny(
        [slmkit_sgd_momentum],
        steps=3,
        folder=tmp_path,
        experiment={"optimizer": {"name": NAME, "learning_rate": 0.1, "nesterov": True}},
    )
    assert list(run.losses) == [1, 2, 3]
    assert all(loss == loss for loss in run.losses.values())  # no NaN
    payload = torch.load(run.run_dir / "checkpoints" / "step_3.pt", weights_only=True)
    state = payload["optimizer"]["state"]
    assert state and all(set(s) == {"momentum_buffer"} for s in state.values())
    assert [g["nesterov"] for g in payload["optimizer"]["param_groups"]] == [True, True]
