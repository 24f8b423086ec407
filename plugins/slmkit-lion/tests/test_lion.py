"""Tests of the ``lion`` optimizer plugin.

Run them with the plugin installed (``uv pip install -e plugins/slmkit-lion``)::

    uv run pytest plugins/slmkit-lion/tests

The hand-computed cases use learning rates, betas and gradients that are exact in binary
floating point, so the expected values are compared exactly, not approximately.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import slmkit.testing
import torch
from slmkit import OptionValueError

from slmkit_lion import NAME, Lion, LionOptions, build_lion

P0 = [1.0, -2.0, 0.5]
G1 = [1.0, -2.0, 0.0]
G2 = [-0.5, 0.25, 0.25]
OPTIONS = LionOptions(betas=[0.5, 0.75])


def exact(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=0, atol=0)


def two_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[list[float]]:
    """Apply gradients G1 then G2 to every parameter; the first one's values after each."""
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


def test_two_steps_by_hand() -> None:
    # lr = 0.5, beta1 = 0.5, beta2 = 0.75
    # Step 1: m = 0;  c = 0.5 G1 = [0.5, -1, 0];  sign(c) = [1, -1, 0]
    #         p = [1, -2, 0.5] - 0.5 [1, -1, 0] = [0.5, -1.5, 0.5]
    #         m = 0.25 G1 = [0.25, -0.5, 0]
    # Step 2: c = 0.5 m + 0.5 G2 = [-0.125, -0.125, 0.125];  sign(c) = [-1, -1, 1]
    #         (coordinate 0: the gradient outvotes the momentum; coordinate 1: the
    #         momentum outvotes the gradient)
    #         p = [0.5, -1.5, 0.5] - 0.5 [-1, -1, 1] = [1, -1, 0]
    #         m = 0.75 [0.25, -0.5, 0] + 0.25 [-0.5, 0.25, 0.25] = [0.0625, -0.3125, 0.0625]
    p = torch.tensor(P0, requires_grad=True)
    opt = build_lion(OPTIONS, kernel_groups(0.5, (p, True)))
    step1, step2 = two_steps(opt, [p])
    assert step1 == [0.5, -1.5, 0.5]
    assert step2 == [1.0, -1.0, 0.0]
    exact(opt.state[p]["exp_avg"], [0.0625, -0.3125, 0.0625])


def test_weight_decay_only_on_decay_groups() -> None:
    # wd = 0.5, lr = 0.5: p <- p - lr (sign(c) + wd p) = 0.75 p - 0.5 sign(c)
    # Step 1: p = 0.75 [1, -2, 0.5] - 0.5 [1, -1, 0] = [0.25, -1, 0.375]
    # Step 2: p = 0.75 [0.25, -1, 0.375] - 0.5 [-1, -1, 1] = [0.6875, -0.25, -0.21875]
    decayed = torch.tensor(P0, requires_grad=True)
    plain = torch.tensor(P0, requires_grad=True)
    options = LionOptions(betas=[0.5, 0.75], weight_decay=0.5)
    opt = build_lion(options, kernel_groups(0.5, (decayed, True), (plain, False)))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    two_steps(opt, [decayed, plain])
    exact(decayed.detach(), [0.6875, -0.25, -0.21875])
    exact(plain.detach(), [1.0, -1.0, 0.0])  # the undecayed result of the test above
    # decoupled: the decay never enters the momentum
    exact(opt.state[decayed]["exp_avg"], [0.0625, -0.3125, 0.0625])
    exact(opt.state[plain]["exp_avg"], [0.0625, -0.3125, 0.0625])


def test_the_step_ignores_the_gradients_scale() -> None:
    small = torch.tensor(P0, requires_grad=True)
    large = torch.tensor(P0, requires_grad=True)
    opt = Lion([small, large], lr=0.25, betas=(0.9, 0.99))
    small.grad = torch.tensor([1e-6, -3e-6, 2e-6])
    large.grad = small.grad * 1e6
    opt.step()
    assert torch.equal(small.detach(), large.detach())
    exact(small.detach(), [0.75, -1.75, 0.25])  # every coordinate moved by exactly lr


def test_reads_the_learning_rate_of_each_group_at_every_step() -> None:
    p = torch.tensor(P0, requires_grad=True)
    opt = build_lion(OPTIONS, kernel_groups(0.5, (p, True)))
    opt.param_groups[0]["lr"] = 0.25  # what the trainer does with a schedule
    p.grad = torch.tensor(G1)
    opt.step()
    exact(p.detach(), [0.75, -1.75, 0.5])


def test_parameters_without_gradient_are_untouched() -> None:
    p = torch.tensor(P0, requires_grad=True)
    opt = Lion([p], lr=0.5, weight_decay=0.5)
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


def test_state_dict_round_trip_continues_identically() -> None:
    options = LionOptions(betas=[0.9, 0.99], weight_decay=0.1)
    model, x, y = _tiny_problem(0)
    opt = build_lion(options, _groups(model, 0.01))
    _train(model, opt, x, y, 3)

    # save as slmkit's checkpoints do (torch.save, loaded back with weights_only=True)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model, _, _ = _tiny_problem(1)  # different weights, overwritten below
    resumed_model.load_state_dict(saved["model"])
    resumed = build_lion(options, _groups(resumed_model, 0.01))
    resumed.load_state_dict(saved["optimizer"])
    assert [g["betas"] for g in resumed.param_groups] == [(0.9, 0.99), (0.9, 0.99)]

    expected = _train(model, opt, x, y, 5)
    got = _train(resumed_model, resumed, x, y, 5)
    assert got == expected
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), resumed.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert expected[-1] < expected[0]  # it does optimise


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("betas", [0.9]),
        ("betas", [0.9, 0.99, 0.999]),
        ("betas", [1.0, 0.99]),
        ("betas", [0.9, -0.1]),
        ("weight_decay", -1e-3),
    ],
)
def test_options_are_validated(field: str, value: Any) -> None:
    with pytest.raises(OptionValueError) as info:
        LionOptions(**{field: value})
    assert info.value.key == field


def test_defaults() -> None:
    options = LionOptions()
    assert (options.betas, options.weight_decay) == ([0.9, 0.99], 0.0)
    p = torch.zeros(2, requires_grad=True)
    opt = build_lion(options, kernel_groups(1e-4, (p, True)))
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)


def test_registers_the_optimizer_through_the_hook() -> None:
    import slmkit_lion

    info = slmkit.testing.load_plugin(slmkit_lion, "slmkit-lion", version="0.1.0")
    assert info.error is None
    assert info.provides == {"optimizer": [NAME]}
    component = info.component("optimizer", NAME)
    assert component.options is LionOptions
    assert component.factory is build_lion
