"""The fast decode step of sampling: bit for bit what ``forward`` computes, the same tokens.

``generate(fast=False)`` is the path sampling took before the fast step (``forward`` for
every token); the fast path must sample exactly its tokens, for any seed, temperature,
``top_k`` and ``top_p``, batch, attention, inside the context window and across restarts.
"""

from __future__ import annotations

import logging

import pytest
import torch
from slmkit_builtin.gpt import GPTBlock, GPTOptions
from torch import nn

from slmkit import decode
from slmkit.components import BlockContext, KVCache, ModelDims
from slmkit.decode import DecodeStep, fast_path_refusal
from slmkit.model import LanguageModel

VOCAB = 99
CTX = 16


# tiny ops: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


DIMS = ModelDims(
    n_layers=2, d_model=32, n_heads=4, d_ff=64, dropout=0.0, context_length=CTX, vocab_size=VOCAB
)


def make_model(attention: str = "sdpa", seed: int = 0, bias: bool = True) -> LanguageModel:
    options = GPTOptions(attention=attention, bias=bias)
    torch.manual_seed(seed)
    return LanguageModel(DIMS, lambda layer: GPTBlock(options, DIMS, layer), pad_id=0)


def tokens(batch: int, time: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, time), generator=torch.Generator().manual_seed(seed))


def sample(
    model: LanguageModel, prompt: torch.Tensor, n: int, *, fast: bool, **kw: float
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(kw.pop("seed", 0)))
    return model.generate(prompt, n, generator=generator, fast=fast, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_step_gives_the_logits_of_forward_bit_for_bit(attention: str, bias: bool) -> None:
    model = make_model(attention, seed=1, bias=bias).eval()
    idx = tokens(2, CTX, seed=2)
    step = model.decode_step()
    with torch.inference_mode():
        plain = [KVCache(CTX) for _ in model.blocks]
        fast = [KVCache(CTX) for _ in model.blocks]
        model(idx[:, :3], caches=plain)
        model(idx[:, :3], caches=fast)
        for t in range(3, CTX):
            expected = model(idx[:, t : t + 1], caches=plain)[0][:, -1]
            assert torch.equal(step(idx[:, t], fast, t), expected), f"position {t}"
            assert fast[0].length == plain[0].length == t + 1
        assert all(
            torch.equal(f.keys, p.keys) and torch.equal(f.values, p.values)  # type: ignore[arg-type]
            for f, p in zip(fast, plain, strict=True)
        )


SETTINGS = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 5},
    {"temperature": 1.3, "top_p": 0.9},
    {"temperature": 0.5, "top_k": 20, "top_p": 0.8},
]


@pytest.mark.parametrize(
    "settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize(
    ("prompt_len", "new"),
    [(1, CTX - 1), (5, CTX - 5), (3, 3 * CTX), (CTX + 5, 20)],
    ids=["fills-context", "fits", "restarts", "long-prompt"],
)
def test_fast_path_samples_the_tokens_of_the_forward_path(
    settings: dict[str, float], attention: str, prompt_len: int, new: int
) -> None:
    # inside the window and past it (restarts through forward, then decode steps again)
    model = make_model(attention, seed=3)
    prompt = tokens(2, prompt_len, seed=4)
    for seed in (0, 1, 2):
        fast = sample(model, prompt, new, fast=True, seed=seed, **settings)
        plain = sample(model, prompt, new, fast=False, seed=seed, **settings)
        assert fast.shape == (2, prompt_len + new)
        assert torch.equal(fast, plain), f"seed {seed}"


#: sampled by the code before the fast path (commit a181444), same model, prompt and seed:
#: 40 tokens for a context of 16, so through two restarts
RECORDED: dict[str, list[list[int]]] = {
    "temperature=1.0": [
        [84, 2, 31, 97, 63, 2, 96, 29, 34, 71, 1, 49, 46, 90, 4, 60, 89, 97, 62, 18],
        [45, 97, 84, 29, 81, 17, 90, 18, 13, 19, 94, 77, 2, 11, 37, 50, 27, 43, 74, 44],
        [33, 95, 68, 46, 15, 53, 76, 82, 36, 33, 97, 23, 31, 57, 93, 69, 85, 45, 21, 97],
        [63, 66, 76, 11, 64, 11, 92, 9, 37, 14, 15, 24, 84, 20, 31, 27, 84, 5, 65, 41],
    ],
    "temperature=0.7,top_k=5": [
        [11, 68, 31, 54, 94, 49, 1, 75, 97, 30, 9, 89, 52, 11, 70, 94, 96, 36, 52, 70],
        [45, 72, 11, 29, 54, 36, 11, 68, 29, 14, 48, 27, 87, 38, 4, 9, 28, 43, 63, 70],
        [68, 31, 31, 58, 43, 1, 1, 27, 30, 25, 23, 88, 31, 52, 27, 67, 15, 58, 60, 52],
        [27, 23, 7, 38, 54, 36, 11, 43, 65, 48, 56, 90, 59, 60, 54, 27, 23, 52, 1, 35],
    ],
}


def parse(name: str) -> list[tuple[str, str]]:
    return [(kv.split("=")[0], kv.split("=")[1]) for kv in name.split(",")]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name", list(RECORDED))
def test_both_paths_sample_the_tokens_recorded_before_the_fast_path(name: str, fast: bool) -> None:
    settings = {k: float(v) if k != "top_k" else int(v) for k, v in parse(name)}
    out = sample(
        make_model("sdpa", seed=3), tokens(2, 3, seed=4), 40, fast=fast, seed=7, **settings
    )
    rows = RECORDED[name]
    assert out[:, 3:].tolist() == [rows[0] + rows[1], rows[2] + rows[3]]


class ForwardOnly(nn.Module):
    """A block without ``decoder``, as a third-party block may be."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.inner = GPTBlock(GPTOptions(), DIMS, layer)

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return self.inner(x, ctx)


def test_a_block_without_decoder_samples_through_forward_and_says_so_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decode, "_noted", set())
    torch.manual_seed(5)
    model = LanguageModel(DIMS, ForwardOnly, pad_id=0)
    torch.manual_seed(5)
    reference = make_model(seed=5)  # the same weights, under GPTBlock's own names
    reference.load_state_dict({k.replace(".inner.", "."): v for k, v in model.state_dict().items()})
    prompt = tokens(1, 3, seed=6)
    with caplog.at_level(logging.WARNING, logger="slmkit.decode"):
        first = sample(model, prompt, 30, fast=True, seed=8)
        again = sample(model, prompt, 30, fast=True, seed=8)
    assert [r.getMessage() for r in caplog.records] == [
        "note: block ForwardOnly has no decoder(): sampling takes the slower path through forward"
    ]
    assert torch.equal(first, again)
    assert torch.equal(first, sample(reference, prompt, 30, fast=True, seed=8))


def test_a_watched_hook_point_sees_every_token_the_fast_path_would_skip() -> None:
    model = make_model(seed=9)
    seen: list[tuple[int, ...]] = []
    point = model.hook_points["blocks.1.hook_resid_post"]
    point.observers.append(lambda name, x: seen.append(tuple(x.shape)))
    assert fast_path_refusal(model.blocks, [point]) == "a forward hook is watching"
    sample(model, tokens(1, 4, seed=10), 5, fast=True)
    assert seen == [(1, 4, 32)] + [(1, 1, 32)] * 4


@pytest.mark.parametrize(("new", "forward_calls"), [(14, 1), (15, 2), (19, 2), (20, 3)])
def test_the_fast_path_steps_every_token_but_the_prompt_and_the_restarts(
    monkeypatch: pytest.MonkeyPatch, new: int, forward_calls: int
) -> None:
    # the 3-token prompt and 13 new tokens fill the 16-token window (the 14th new token is
    # drawn from it full); the 15th restarts it with the last 12 tokens through forward,
    # which leaves room for 4 decode steps
    calls = {"decode": 0, "forward": 0}
    decode_step, forward = DecodeStep.__call__, LanguageModel.forward

    def count_decode(self: DecodeStep, *args: object) -> torch.Tensor:
        calls["decode"] += 1
        return decode_step(self, *args)  # type: ignore[arg-type]

    def count_forward(self: LanguageModel, *args: object, **kw: object) -> object:
        calls["forward"] += 1
        return forward(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(DecodeStep, "__call__", count_decode)
    monkeypatch.setattr(LanguageModel, "forward", count_forward)
    sample(make_model(seed=11), tokens(1, 3, seed=12), new, fast=True)
    assert calls == {"decode": new - forward_calls, "forward": forward_calls}
