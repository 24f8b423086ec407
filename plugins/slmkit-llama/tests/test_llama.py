"""Tests of the ``llama`` block plugin.

Run them with the plugin installed (``uv pip install -e plugins/slmkit-llama``)::

    uv run pytest plugins/slmkit-llama/tests
"""

from __future__ import annotations

from typing import Any

import pytest
import slmkit.testing
import torch
from slmkit import BlockContext, ConfigError, ModelDims, OptionValueError, causal_mask

import slmkit_llama
from slmkit_llama import (
    NAME,
    LlamaBlock,
    LlamaOptions,
    apply_rope,
    swiglu_hidden_size,
)

VOCAB = 41


def build(model: dict[str, Any] | None = None, seed: int = 0) -> torch.nn.Module:
    """A small model with the llama block (2 layers, d_model 32, 4 heads), built by slmkit."""
    return slmkit.testing.tiny_model(NAME, [slmkit_llama], model=model, vocab_size=VOCAB, seed=seed)


# -- rotary embeddings ------------------------------------------------------------------------


def test_rope_preserves_norms() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 16, dtype=torch.float64)
    positions = torch.arange(100, 117)
    rotated = apply_rope(x, positions)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(rotated, x)  # it does rotate


def test_rope_at_position_zero_is_the_identity() -> None:
    x = torch.randn(1, 1, 1, 8)
    assert torch.equal(apply_rope(x, torch.tensor([0])), x)


def test_rope_scores_depend_only_on_the_relative_position() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        rq = apply_rope(q.view(1, 16), torch.tensor([m]))
        rk = apply_rope(k.view(1, 16), torch.tensor([n]))
        return (rq * rk).sum()

    for m, n in [(5, 2), (0, 0), (9, 3), (31, 0)]:
        for shift in (1, 7, 250, 4096):
            torch.testing.assert_close(score(m + shift, n + shift), score(m, n))
    # ... and does depend on it
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_rope_base_changes_the_rotation() -> None:
    x = torch.randn(1, 4, 8)
    positions = torch.arange(4)
    assert not torch.allclose(apply_rope(x, positions, 10000.0), apply_rope(x, positions, 100.0))


def test_rope_needs_an_even_head_width() -> None:
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(2, 5), torch.arange(2))


# -- the block --------------------------------------------------------------------------------


def test_swiglu_hidden_size() -> None:
    assert swiglu_hidden_size(32) == 88  # int(85.33) = 85, rounded up to 88
    assert swiglu_hidden_size(128) == 344
    assert swiglu_hidden_size(4096) == 10928
    assert swiglu_hidden_size(32, hidden_size=50) == 50


def test_block_shape_and_causality() -> None:
    dims = ModelDims(2, 32, 4, 64, 0.0, 16, 10)
    torch.manual_seed(0)
    block = LlamaBlock(LlamaOptions(), dims, 0).eval()
    x = torch.randn(2, 10, 32)
    y = block(x, BlockContext(torch.arange(10)))
    assert y.shape == x.shape
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, 32)  # the future must not change the past
    y2 = block(changed, BlockContext(torch.arange(10)))
    torch.testing.assert_close(y2[:, :6], y[:, :6])
    assert not torch.allclose(y2[:, 6:], y[:, 6:])


def test_block_has_no_biases_by_default_and_biases_on_request() -> None:
    dims = ModelDims(1, 32, 4, 64, 0.0, 16, 10)
    plain = LlamaBlock(LlamaOptions(), dims, 0)
    assert not [n for n, _ in plain.named_parameters() if n.endswith("bias")]
    biased = LlamaBlock(LlamaOptions(bias=True), dims, 0)
    assert {n for n, _ in biased.named_parameters() if n.endswith("bias")} == {
        "attn.qkv.bias", "attn.proj.bias", "mlp.gate.bias", "mlp.up.bias", "mlp.down.bias"
    }  # fmt: skip
    assert biased.mlp.gate.out_features == 88


def test_model_built_through_slmkit_has_no_position_table() -> None:
    model = build()
    assert model.pos_emb is None
    assert not [n for n, _ in model.named_parameters() if "pos_emb" in n]
    assert all(isinstance(b, LlamaBlock) for b in model.blocks)
    assert LlamaBlock.learned_positions is False
    names = set(model.hook_points)
    for point in (
        "blocks.0.hook_resid_pre", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k",
        "blocks.0.attn.hook_v", "blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k",
        "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_out", "blocks.0.mlp.hook_pre",
        "blocks.0.mlp.hook_pre_linear", "blocks.0.mlp.hook_post", "blocks.1.hook_resid_post",
    ):  # fmt: skip
        assert point in names, point
    logits, loss = model(torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 12)))
    assert logits.shape == (2, 12, VOCAB)
    assert loss is not None and torch.isfinite(loss)


def test_options_reach_the_block_through_the_experiment() -> None:
    model = build({"rope_base": 500.0, "bias": True, "hidden_size": 40})
    block = model.blocks[0]
    assert block.attn.rope_base == 500.0
    assert block.attn.qkv.bias is not None
    assert block.mlp.up.out_features == 40


def test_odd_head_width_is_an_option_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.n_heads: .*even head width"):
        build({"d_model": 30, "n_heads": 2})  # d_head = 15


@pytest.mark.parametrize(
    ("field", "value"),
    [("rope_base", 0.0), ("rope_base", -1.0), ("bias", 1), ("hidden_size", -1), ("norm_eps", 0.0)],
)
def test_options_are_validated(field: str, value: Any) -> None:
    with pytest.raises(OptionValueError) as info:
        LlamaOptions(**{field: value})
    assert info.value.key == field


def test_registers_the_block_through_the_hook() -> None:
    info = slmkit.testing.load_plugin(slmkit_llama, "slmkit-llama", version="0.1.0")
    assert info.error is None
    assert info.provides == {"block": [NAME]}
    component = info.component("block", NAME)
    assert component.options is LlamaOptions
    assert component.factory is LlamaBlock


# -- generation with the KV cache ---------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        [1] * 20,  # token by token
        [8] + [1] * 12,  # prefill, then one token at a time
        [5, 3, 1, 4, 1, 6],  # prefill, then chunks: queries offset against cached keys
    ],
    ids=["token-by-token", "prefill+steps", "prefill+chunks"],
)
def test_kv_cache_gives_the_logits_of_the_whole_context(chunks: list[int]) -> None:
    # within slmkit.testing.DEFAULT_ATOL = 1e-5 (rtol 0), and every layer's cache holds
    # all the tokens afterwards
    slmkit.testing.check_kv_cache(build(), chunks=chunks, seed=3)


def test_kv_cache_over_whole_windows() -> None:
    worst = slmkit.testing.check_kv_cache(build())  # the default schedules, 32 tokens each
    assert worst <= 1e-5


def test_generate_with_and_without_cache_agree() -> None:
    model = build()
    prompt = torch.randint(0, VOCAB, (1, 5))
    a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(0), use_cache=True)
    b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bias", [False, True])
def test_the_fast_decode_step_computes_what_forward_does(bias: bool) -> None:
    # bit for bit, position by position over a whole window (slmkit.testing.check_decode)
    slmkit.testing.check_decode(build({"bias": bias}), seed=4)


def test_watching_the_pattern_changes_nothing_and_gives_causal_rows() -> None:
    model = build()
    tokens = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        plain, _ = model(tokens)
        seen: dict[str, torch.Tensor] = {}
        point = model.hook_points["blocks.1.attn.hook_pattern"]
        point.observers.append(lambda name, t: seen.__setitem__(name, t.clone()))
        try:
            watched, _ = model(tokens)
        finally:
            point.observers.clear()
    assert torch.equal(plain, watched)
    pattern = seen["blocks.1.attn.hook_pattern"]
    assert pattern.shape == (2, 4, 10, 10)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 10))
    assert torch.all(pattern.masked_select(~causal_mask(10, 10, pattern.device)) == 0)
