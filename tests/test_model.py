"""The language model frame with the ``gpt`` block: attention paths, loss, init, KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from slmkit_builtin.gpt import GPTBlock, GPTOptions
from torch import nn

from slmkit.blocks import causal_mask
from slmkit.components import KVCache, ModelDims
from slmkit.model import LanguageModel

VOCAB = 99
CTX = 16
ATTENTIONS = ["sdpa", "explicit"]


# tiny ops: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_dims(**overrides: float) -> ModelDims:
    values: dict[str, float] = {
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 4,
        "d_ff": 64,
        "dropout": 0.0,
        "context_length": CTX,
        "vocab_size": VOCAB,
    }
    values.update(overrides)
    return ModelDims(**values)  # type: ignore[arg-type]


def make_model(
    attention: str = "sdpa", seed: int = 0, dims: ModelDims | None = None, bias: bool = True
) -> LanguageModel:
    dims = dims or make_dims()
    options = GPTOptions(attention=attention, bias=bias)
    torch.manual_seed(seed)
    return LanguageModel(dims, lambda layer: GPTBlock(options, dims, layer), pad_id=0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """Elementwise ``|actual - expected| <= atol`` (torch.testing.assert_close would do,
    but its first call imports sympy, which costs seconds)."""
    assert actual.shape == expected.shape
    worst = (actual - expected).abs().max().item()
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol}"


def tokens(batch: int, time: int, seed: int = 0, low: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, time), generator=generator)


# --- attention paths ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("bias", [True, False])
def test_sdpa_and_explicit_attention_agree(mode: str, bias: bool) -> None:
    sdpa = make_model("sdpa", seed=3, bias=bias)
    explicit = make_model("explicit", seed=3, bias=bias)
    explicit.load_state_dict(sdpa.state_dict())
    for model in (sdpa, explicit):
        model.train(mode == "train")  # dropout is 0, so train mode is deterministic too
    idx = tokens(3, CTX, seed=1)
    targets = tokens(3, CTX, seed=2)
    logits_a, loss_a = sdpa(idx, targets)
    logits_b, loss_b = explicit(idx, targets)
    assert_close(logits_a, logits_b, atol=1e-5)
    assert loss_a is not None and loss_b is not None
    assert_close(loss_a, loss_b, atol=1e-5)


def test_same_seed_builds_the_same_model_for_both_attentions() -> None:
    a = make_model("sdpa", seed=11).state_dict()
    b = make_model("explicit", seed=11).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_attention_is_causal() -> None:
    model = make_model("sdpa").eval()
    idx = tokens(2, CTX, seed=4)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % VOCAB
    before, _ = model(idx)
    after, _ = model(changed)
    assert_close(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_causal_mask_with_cached_keys() -> None:
    assert causal_mask(3, 3, torch.device("cpu")).tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]
    assert causal_mask(2, 4, torch.device("cpu")).tolist() == [
        [True, True, True, False],
        [True, True, True, True],
    ]


# --- shapes and loss ---------------------------------------------------------------------


@pytest.mark.parametrize("time", [1, 5, CTX])
def test_output_shapes(time: int) -> None:
    model = make_model().eval()
    logits, loss = model(tokens(3, time))
    assert logits.shape == (3, time, VOCAB)
    assert logits.dtype == torch.float32
    assert loss is None
    _, loss = model(tokens(3, time), tokens(3, time, seed=9))
    assert loss is not None
    assert loss.shape == ()


def test_loss_ignores_pad_targets() -> None:
    model = make_model().eval()
    idx = tokens(2, CTX, seed=5)
    targets = tokens(2, CTX, seed=6)
    targets[0, :5] = 0
    targets[1, 9:] = 0
    logits, loss = model(idx, targets)
    keep = targets != 0
    manual = F.cross_entropy(logits[keep], targets[keep])
    assert loss is not None
    assert_close(loss, manual, atol=1e-6)
    # what a loss that counted PAD targets would give is different
    counted = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert not torch.allclose(loss, counted)


def test_loss_without_pad_id_counts_every_target() -> None:
    dims = make_dims()
    torch.manual_seed(0)
    model = LanguageModel(dims, lambda layer: GPTBlock(GPTOptions(), dims, layer)).eval()
    idx = tokens(2, CTX, seed=5)
    targets = tokens(2, CTX, seed=6, low=0)
    targets[0, :3] = 0
    logits, loss = model(idx, targets)
    assert loss is not None
    manual = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert_close(loss, manual, atol=1e-6)


def test_fresh_model_loss_is_near_uniform() -> None:
    model = make_model().eval()
    _, loss = model(tokens(4, CTX, seed=1), tokens(4, CTX, seed=2))
    assert loss is not None
    assert abs(loss.item() - math.log(VOCAB)) < 0.1


# --- initialisation ----------------------------------------------------------------------


def test_gpt2_initialisation() -> None:
    n_layers = 4
    dims = make_dims(n_layers=n_layers, d_model=256, n_heads=4, d_ff=1024, context_length=256)
    model = make_model(dims=dims, seed=0)
    residual_std = 0.02 / math.sqrt(2 * n_layers)

    def close(weight: torch.Tensor, std: float) -> None:
        got = weight.detach().std().item()
        assert abs(got - std) < 0.03 * std, (got, std)
        assert abs(weight.detach().mean().item()) < 0.05 * std

    close(model.tok_emb.weight, 0.02)
    close(model.pos_emb.weight, 0.02)
    close(model.head.weight, 0.02)
    for block in model.blocks:
        assert isinstance(block, GPTBlock)
        close(block.attn.qkv.weight, 0.02)
        close(block.mlp.fc.weight, 0.02)
        close(block.attn.proj.weight, residual_std)
        close(block.mlp.proj.weight, residual_std)
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            assert linear.bias is not None
            assert torch.count_nonzero(linear.bias) == 0
        for norm in (block.ln_1, block.ln_2):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
            assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


# --- parameter groups --------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_param_groups(bias: bool) -> None:
    model = make_model(bias=bias)
    decay_group, no_decay_group = model.param_groups(3e-4)
    assert decay_group["decay"] is True and no_decay_group["decay"] is False
    assert decay_group["lr"] == no_decay_group["lr"] == 3e-4

    names = {id(p): name for name, p in model.named_parameters()}
    decay = [names[id(p)] for p in decay_group["params"]]
    no_decay = [names[id(p)] for p in no_decay_group["params"]]

    expected_decay = {"head.weight"}
    expected_no_decay = {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias"}
    for layer in range(2):
        b = f"blocks.{layer}"
        for linear in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"):
            expected_decay.add(f"{b}.{linear}.weight")
            if bias:
                expected_no_decay.add(f"{b}.{linear}.bias")
        for norm in ("ln_1", "ln_2"):
            expected_no_decay.add(f"{b}.{norm}.weight")
            if bias:
                expected_no_decay.add(f"{b}.{norm}.bias")

    assert set(decay) == expected_decay
    assert set(no_decay) == expected_no_decay
    # every parameter exactly once
    assert len(decay) + len(no_decay) == len(set(decay) | set(no_decay))
    assert set(decay) | set(no_decay) == set(names.values())
    assert all(model.get_parameter(n).dim() == 2 for n in decay)
    modules = dict(model.named_modules())
    for n in no_decay:
        owner = modules[n.rpartition(".")[0]]
        assert n.endswith(".bias") or isinstance(owner, nn.LayerNorm | nn.Embedding)
    assert sum(p.numel() for g in (decay_group, no_decay_group) for p in g["params"]) == (
        model.n_params
    )


def test_param_groups_skip_frozen_parameters() -> None:
    model = make_model()
    model.pos_emb.weight.requires_grad_(False)
    groups = model.param_groups(1e-3)
    assert all(p is not model.pos_emb.weight for g in groups for p in g["params"])


# --- KV cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cache_token_by_token_matches_full_sequence(attention: str) -> None:
    model = make_model(attention, seed=1).eval()
    idx = tokens(2, CTX, seed=7)
    with torch.no_grad():
        full, _ = model(idx)
        caches = [KVCache() for _ in model.blocks]
        steps = [model(idx[:, t : t + 1], caches=caches)[0] for t in range(CTX)]
    assert all(cache.length == CTX for cache in caches)
    assert caches[0].keys is not None
    assert caches[0].keys.shape == (2, 4, CTX, 8)  # (batch, heads, time, d_head)
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 1], [7, 3, 1, 5], [1, 15], [16]])
def test_cache_prefill_then_steps_matches_full_sequence(attention: str, chunks: list[int]) -> None:
    model = make_model(attention, seed=2).eval()
    time = sum(chunks)
    idx = tokens(3, time, seed=8)
    with torch.no_grad():
        full, _ = model(idx)
        caches = [KVCache() for _ in model.blocks]
        pieces, start = [], 0
        for size in chunks:
            pieces.append(model(idx[:, start : start + size], caches=caches)[0])
            start += size
    assert caches[0].length == time
    assert_close(torch.cat(pieces, dim=1), full, atol=1e-5)


def kv(batch: int, time: int, seed: int, heads: int = 4, d_head: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, time, d_head, generator=generator)


def test_preallocated_cache_writes_in_place_and_returns_views() -> None:
    cache = KVCache(max_length=CTX)
    steps = [(kv(2, 3, seed=0), kv(2, 3, seed=1))] + [
        (kv(2, 1, seed=2 * i), kv(2, 1, seed=2 * i + 1)) for i in range(1, CTX - 2)
    ]
    first_keys, _ = cache.append(*steps[0])
    for keys, values in steps[1:]:
        all_keys, all_values = cache.append(keys, values)
        # one buffer for the whole window: every step's result starts at the same memory
        assert all_keys.data_ptr() == first_keys.data_ptr()
    assert cache.length == CTX and cache.capacity == CTX
    assert torch.equal(all_keys, torch.cat([k for k, _ in steps], dim=2))
    assert torch.equal(all_values, torch.cat([v for _, v in steps], dim=2))
    assert cache.keys is not None and torch.equal(cache.keys, all_keys)


def test_cache_without_max_length_grows_and_keeps_its_contents() -> None:
    cache = KVCache()
    pieces = [(kv(1, n, seed=n), kv(1, n, seed=100 + n)) for n in (2, 1, 5, 1, 9, 1)]
    for keys, values in pieces:
        all_keys, all_values = cache.append(keys, values)
    assert cache.length == 19 and cache.capacity >= 19
    assert torch.equal(all_keys, torch.cat([k for k, _ in pieces], dim=2))
    assert torch.equal(all_values, torch.cat([v for _, v in pieces], dim=2))


def test_empty_and_reset_cache_state() -> None:
    cache = KVCache(max_length=8)
    assert (cache.length, cache.capacity, cache.keys, cache.values) == (0, 0, None, None)
    old_keys, _ = cache.append(kv(1, 5, seed=0), kv(1, 5, seed=1))
    cache.reset()
    assert (cache.length, cache.capacity, cache.keys, cache.values) == (0, 8, None, None)
    keys, values = kv(1, 3, seed=2), kv(1, 3, seed=3)
    new_keys, new_values = cache.append(keys, values)
    assert new_keys.data_ptr() == old_keys.data_ptr()  # the buffer is reused
    assert torch.equal(new_keys, keys) and torch.equal(new_values, values)
    # a reset cache takes other shapes too (a new buffer)
    cache.reset()
    wide, _ = cache.append(kv(3, 2, seed=4), kv(3, 2, seed=5))
    assert wide.shape == (3, 4, 2, 8) and cache.length == 2


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_reset_cache_gives_the_same_logits_as_a_fresh_one(attention: str) -> None:
    model = make_model(attention, seed=3).eval()
    idx = tokens(2, CTX, seed=9)
    with torch.no_grad():
        full, _ = model(idx[:, 4:])
        caches = [KVCache(CTX) for _ in model.blocks]
        model(idx, caches=caches)  # fill the caches with other keys first
        for cache in caches:
            cache.reset()
        first, _ = model(idx[:, 4:9], caches=caches)
        rest = [model(idx[:, t : t + 1], caches=caches)[0] for t in range(9, CTX)]
    assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5)


# --- generation --------------------------------------------------------------------------


def _generate(
    model: LanguageModel, prompt: torch.Tensor, n: int, seed: int, use_cache: bool
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return model.generate(prompt, n, temperature=1.0, generator=generator, use_cache=use_cache)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize(("prompt_len", "new"), [(1, 15), (4, 12), (10, 6)])
def test_generate_with_and_without_cache_agree(attention: str, prompt_len: int, new: int) -> None:
    # prompt + new tokens fit in context_length, so both paths see the same context.
    # The logits differ only by float rounding (~1e-7); for these fixed seeds no uniform
    # draw falls that close to a bucket edge, so the tokens compare exactly.
    model = make_model(attention, seed=4)
    prompt = tokens(2, prompt_len, seed=10)
    cached = _generate(model, prompt, new, seed=5, use_cache=True)
    plain = _generate(model, prompt, new, seed=5, use_cache=False)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached[:, :prompt_len], prompt)
    assert torch.equal(cached, plain)


def windowed_reference(
    model: LanguageModel, prompt: torch.Tensor, n: int, seed: int
) -> torch.Tensor:
    """Sampling by recomputation over the window the cached path sees: the last
    ``CTX`` tokens at first, and after each restart the last three quarters of the window
    plus the tokens sampled since."""
    generator = torch.Generator().manual_seed(seed)
    keep = CTX - CTX // 4
    out, start = prompt, max(0, prompt.shape[1] - CTX)
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            if out.shape[1] - start > CTX:
                start = out.shape[1] - keep
            logits, _ = model(out[:, start:])
            probs = F.softmax(logits[:, -1, :].float(), dim=-1)
            token = torch.multinomial(probs, num_samples=1, generator=generator)
            out = torch.cat([out, token], dim=1)
    return out


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize(
    ("prompt_len", "new"),
    [(1, CTX), (1, CTX + 1), (3, 3 * CTX), (CTX - 1, 2), (CTX, 6), (CTX + 5, 20)],
)
def test_cached_generation_follows_its_window_past_the_context(
    attention: str, prompt_len: int, new: int
) -> None:
    # Token for token, the cache path equals recomputing over the window it keeps: up to
    # the context length, then across each restart (the buffers are reused, not rebuilt).
    model = make_model(attention, seed=11)
    prompt = tokens(2, prompt_len, seed=14)
    cached = _generate(model, prompt, new, seed=6, use_cache=True)
    assert torch.equal(cached, windowed_reference(model, prompt, new, seed=6))


def test_generate_returns_an_ordinary_tensor() -> None:
    # sampling runs in inference mode; what it returns must still be usable for training
    model = make_model(seed=12)
    out = _generate(model, tokens(2, 3), 8, seed=0, use_cache=True)
    assert not out.is_inference()
    _, loss = model(out[:, :-1], out[:, 1:])
    assert loss is not None
    loss.backward()


def test_generate_same_seed_same_output_different_seed_differs() -> None:
    model = make_model(seed=6)
    prompt = tokens(1, 3, seed=11)
    first = _generate(model, prompt, 12, seed=21, use_cache=True)
    again = _generate(model, prompt, 12, seed=21, use_cache=True)
    other = _generate(model, prompt, 12, seed=22, use_cache=True)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert ((first >= 0) & (first < VOCAB)).all()


def test_generate_leaves_the_global_rng_and_training_mode_alone() -> None:
    model = make_model(dims=make_dims(dropout=0.1), seed=7)
    model.train()
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    _generate(model, tokens(1, 2), 20, seed=1, use_cache=True)
    _generate(model, tokens(1, 2), 20, seed=1, use_cache=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    model.eval()
    _generate(model, tokens(1, 2), 3, seed=1, use_cache=True)
    assert not model.training


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(("prompt_len", "new"), [(3, 40), (CTX, 5), (CTX + 7, 9)])
def test_generate_past_context_length(use_cache: bool, prompt_len: int, new: int) -> None:
    model = make_model(seed=8)
    prompt = tokens(2, prompt_len, seed=12)
    out = _generate(model, prompt, new, seed=3, use_cache=use_cache)
    assert out.shape == (2, prompt_len + new)
    assert torch.equal(out[:, :prompt_len], prompt)
    assert ((out >= 0) & (out < VOCAB)).all()


def test_generate_zero_tokens_returns_the_prompt() -> None:
    model = make_model()
    prompt = tokens(1, 4)
    assert torch.equal(_generate(model, prompt, 0, seed=0, use_cache=True), prompt)


def test_generate_at_low_temperature_is_greedy() -> None:
    model = make_model(seed=9).eval()
    prompt = tokens(1, 5, seed=13)
    out = model.generate(prompt, 6, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    # greedy decoding by hand, recomputing the whole context each step
    expected = prompt
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(expected)
            expected = torch.cat([expected, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, expected)
