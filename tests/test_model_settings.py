"""The ``[model]`` settings of the frame around the blocks: ``final_norm`` and ``init``."""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import pytest
import torch
from torch import nn

import slmkit
from slmkit import checkpoint, testing
from slmkit.cli import main
from slmkit.plugins import PluginManager
from slmkit.trained import load_trained

# tiny ops: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- final_norm ----------------------------------------------------------------------------


def test_without_final_norm_the_head_reads_the_last_blocks_output() -> None:
    plain = testing.tiny_model(model={"final_norm": False}, seed=3)
    normed = testing.tiny_model(seed=3)
    assert plain.ln_f is None
    testing.check_decode(plain)  # fast sampling steps without the norm too, bit for bit
    assert not [n for n, _ in plain.named_parameters() if n.startswith("ln_f")]
    assert "ln_f.hook_normalized" in normed.hook_points
    assert "ln_f.hook_normalized" not in plain.hook_points
    # a LayerNorm draws nothing at initialisation: every other parameter is the same
    normed_params = dict(normed.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(p, normed_params[name]), name
    d_model = testing.TINY_MODEL["d_model"]
    assert normed.n_non_embedding_params - plain.n_non_embedding_params == 2 * d_model

    idx = torch.randint(64, (3, 10), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(10)
    with torch.no_grad():
        residual = plain.tok_emb(idx) + plain.pos_emb(positions)
        for block in plain.blocks:
            residual = block(residual, slmkit.BlockContext(positions))
        logits, _ = plain(idx)
        assert torch.equal(logits, plain.head(residual))
        assert torch.equal(plain.readout(residual), plain.head(residual))
        normed_logits, _ = normed(idx)
        assert torch.equal(normed_logits, normed.head(normed.ln_f(residual)))
    assert not torch.equal(logits, normed_logits)


def test_a_hook_on_the_final_norm_of_a_model_without_one_is_refused(
    write_experiment, capsys
) -> None:
    path = write_experiment({
        "model": {"final_norm": False},
        "forward_hooks": [{"name": "capture", "points": ["ln_f.hook_normalized"]}],
    })  # fmt: skip
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    key = "forward_hooks.0.points"
    assert err.startswith(
        f"slmkit: error: {path}: {key}: 'ln_f.hook_normalized' matches no hook point"
    ), err
    assert err.count("\n") == 1
    # with the norm the same hook is fine
    ok = write_experiment(
        {"forward_hooks": [{"name": "capture", "points": ["ln_f.hook_normalized"]}]}, "ok.toml"
    )
    assert main(["validate", str(ok)]) == 0


# -- init ------------------------------------------------------------------------------------


def assert_uniform_within(weight: torch.Tensor, bound: float) -> None:
    """``weight`` looks drawn from U(-bound, bound): inside it, and with its spread."""
    w = weight.detach()
    assert w.abs().max().item() <= bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
    assert abs(w.mean().item()) < 0.05 * bound


def test_torch_init_gives_every_module_pytorchs_default_initialisation() -> None:
    sizes = {"d_model": 128, "d_ff": 512, "n_heads": 4, "context_length": 64}
    model = testing.tiny_model(model={**sizes, "init": "torch"}, vocab_size=96, seed=5)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4 + 1  # qkv, attn proj, fc, mlp proj per block; the head
    for linear in linears:
        bound = 1 / math.sqrt(linear.in_features)  # Kaiming-uniform with a = sqrt(5)
        assert_uniform_within(linear.weight, bound)
        if linear.bias is not None:
            assert linear.bias.abs().max().item() <= bound
            assert torch.count_nonzero(linear.bias) == linear.bias.numel()
    for embedding in (model.tok_emb, model.pos_emb):
        assert embedding is not None
        assert abs(embedding.weight.std().item() - 1.0) < 0.05  # N(0, 1)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))

    # the seed fixes it, and the default stays GPT-2's (N(0, 0.02), zero biases)
    again = testing.tiny_model(model={**sizes, "init": "torch"}, vocab_size=96, seed=5)
    for (name, p), q in zip(model.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), name
    gpt2 = testing.tiny_model(model=sizes, vocab_size=96, seed=5)
    qkv = gpt2.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.001
    assert torch.count_nonzero(qkv.bias) == 0
    assert abs(gpt2.tok_emb.weight.std().item() - 0.02) < 0.001


class FixedLinear(nn.Module):
    """A third-party block that initialises itself: a zero linear map and its own gain."""

    def __init__(self, options: object, dims: slmkit.ModelDims, layer: int) -> None:
        super().__init__()
        self.mix = nn.Linear(dims.d_model, dims.d_model)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)
        self.gain = nn.Parameter(torch.full((dims.d_model,), 0.5))

    def forward(self, x: torch.Tensor, ctx: slmkit.BlockContext) -> torch.Tensor:
        return x + self.gain * self.mix(x)


class FixedLinearPlugin:
    @slmkit.hookimpl
    def register_blocks(self, register: slmkit.Register) -> None:
        register("fixed_linear", FixedLinear)


def test_torch_init_resets_a_third_party_blocks_torch_modules_and_keeps_its_own_parameters() -> (
    None
):
    own = testing.tiny_model("fixed_linear", [FixedLinearPlugin()])
    reset = testing.tiny_model("fixed_linear", [FixedLinearPlugin()], model={"init": "torch"})
    for block in own.blocks:
        assert isinstance(block, FixedLinear)
        assert torch.count_nonzero(block.mix.weight) == 0  # gpt2: the block's own choice
    for block in reset.blocks:
        assert isinstance(block, FixedLinear)
        bound = 1 / math.sqrt(block.mix.in_features)
        assert 0 < block.mix.weight.abs().max().item() <= bound
        assert torch.equal(block.gain, torch.full_like(block.gain, 0.5))  # not a torch module's


# -- refused values --------------------------------------------------------------------------


@attrs.define
class Bad:
    model: dict[str, object]
    message: str


@pytest.mark.parametrize(
    "bad",
    [
        Bad({"init": "xavier"}, "model.init: must be one of 'gpt2', 'torch', got 'xavier'"),
        Bad({"init": 2}, "model.init: expected a string, got integer 2"),
        Bad({"final_norm": "no"}, "model.final_norm: expected true or false"),
    ],
    ids=["init-name", "init-type", "final_norm-type"],
)
def test_bad_values_are_one_line_naming_the_file_and_the_key(
    write_experiment, capsys, bad: Bad
) -> None:
    path = write_experiment({"model": bad.model})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slmkit: error: {path}: {bad.message}"), err
    assert err.count("\n") == 1 and "Traceback" not in err


# -- saved and loaded ------------------------------------------------------------------------


def test_a_saved_model_without_final_norm_and_with_torch_init_loads_and_evaluates_alike(
    tmp_path: Path,
) -> None:
    run = testing.train_tiny(
        steps=3,
        experiment={"model": {"final_norm": False, "init": "torch"}},
        folder=tmp_path,
    )
    trained = load_trained(run.run_dir, PluginManager(entry_points=False).load(), device="cpu")
    assert trained.model.ln_f is None
    saved = checkpoint.load(checkpoint.resolve(run.run_dir))["model"]
    assert not [name for name in saved if name.startswith("ln_f")]
    loaded = trained.model.state_dict()
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    idx = torch.randint(trained.model.dims.vocab_size, (2, 12), generator=torch.Generator())
    with torch.no_grad():
        assert torch.equal(trained.model(idx)[0], run.model(idx)[0])
