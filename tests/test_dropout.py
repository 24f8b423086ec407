"""slmkit's dropout: the same contract as F.dropout, with its mask drawn from 16-bit numbers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmkit.dropout_mask import Dropout, dropout


def test_identity_in_eval_mode_and_at_p_zero() -> None:
    x = torch.randn(5, 7)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0) is x


@settings(deadline=None, max_examples=25)
@given(p=st.floats(0.01, 0.9), n=st.integers(1, 2000))
def test_kept_elements_are_scaled_by_the_rounded_keep_probability(p: float, n: int) -> None:
    x = torch.rand(n) + 0.5  # no zeros of its own
    y = dropout(x, p)
    dropped = round(p * 65536)
    kept = y != 0
    scale = 65536 / (65536 - dropped)
    assert torch.equal(y[kept], x[kept] * torch.tensor(scale, dtype=x.dtype))
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_each_of_the_four_16_bit_lanes_drops_p(p: float) -> None:
    # 64 random bits make four numbers: a biased bit (random_ without a range leaves the
    # sign bit of int64 at 0) would show up as one lane dropping far more or less.
    torch.manual_seed(0)
    n = 1 << 18
    y = dropout(torch.ones(n * 4), p).view(n, 4)
    sigma = math.sqrt(p * (1 - p) / n)
    for lane in range(4):
        rate = (y[:, lane] == 0).double().mean().item()
        assert abs(rate - p) < 6 * sigma, (lane, rate)
    assert abs(y.double().mean().item() - 1.0) < 0.01  # the expectation is kept


def test_the_mask_follows_the_default_generator() -> None:
    x = torch.ones(1001)
    torch.manual_seed(3)
    first = dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.2), first)
    assert not torch.equal(dropout(x, 0.2), first)  # the draw advanced the generator


def test_the_gradient_is_the_mask_times_the_scale() -> None:
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.25)
    y.sum().backward()
    assert x.grad is not None
    expected = (y.detach() != 0).float() * (65536 / (65536 - 16384))
    assert torch.equal(x.grad, expected)


def test_probabilities_it_cannot_round_go_to_f_dropout() -> None:
    x = torch.ones(100)
    assert torch.equal(dropout(x, 1.0), torch.zeros(100))
    y = dropout(x, 1e-7)  # F.dropout: almost surely keeps all 100, scaled by 1/(1 - p)
    assert (y != 0).all() and torch.allclose(y, x)


def test_the_module_is_a_drop_in_for_nn_dropout() -> None:
    layer = Dropout(0.5)
    assert repr(layer) == "Dropout(p=0.5)"
    x = torch.ones(10)
    assert layer.eval()(x) is x
    assert (layer.train()(x) == 0).any()
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\], got 1.5"):
        Dropout(1.5)


def test_bf16_inputs_keep_their_dtype() -> None:
    x = torch.ones(4096, dtype=torch.bfloat16)
    y = dropout(x, 0.1)
    assert y.dtype == torch.bfloat16 and set(y.unique().tolist()) <= {0.0, 1.109375}
