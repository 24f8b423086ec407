"""``slmkit.testing``, the helpers plugins' tests use; and the plugin contract they show.

The KV-cache check must pass the ``gpt`` block (both attention paths) and catch blocks
whose cache is wrong: one that drops the newest key, one that never appends. The decode
check must pass the ``gpt`` block's ``decoder`` and catch one that is not ``forward``. The
tiny runs also prove what docs/writing-plugins.md promises block and hook authors: forward
hooks watch the first micro-batch of an accumulated step, ``run.run_dir`` is a
``pathlib.Path``, and run events repeat for the steps a resumed run trains again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from slmkit_builtin.gpt import GPTBlock, GPTOptions

import slmkit
from slmkit import testing

# -- deliberately broken blocks ------------------------------------------------------------


class DroppingCache:
    """A cache that hides the newest key and value from every call after the first."""

    def __init__(self, cache: slmkit.KVCache) -> None:
        self.cache = cache

    @property
    def length(self) -> int:
        return self.cache.length

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        earlier = self.cache.length
        all_keys, all_values = self.cache.append(keys, values)
        if earlier:
            return all_keys[:, :, :-1], all_values[:, :, :-1]
        return all_keys, all_values


class DropsLastKey(GPTBlock):
    """The gpt block, attending past its newest key whenever it generates with a cache."""

    def forward(self, x: torch.Tensor, ctx: slmkit.BlockContext) -> torch.Tensor:
        if ctx.cache is not None:
            # a stand-in with the KVCache methods blocks use
            ctx = slmkit.BlockContext(ctx.positions, DroppingCache(ctx.cache))  # type: ignore[arg-type]
        return super().forward(x, ctx)


class NeverAppends(GPTBlock):
    """The gpt block, ignoring the cache: attends to the new tokens only."""

    def forward(self, x: torch.Tensor, ctx: slmkit.BlockContext) -> torch.Tensor:
        return super().forward(x, slmkit.BlockContext(ctx.positions))


class NudgedWhenCached(GPTBlock):
    """The gpt block, its first feature off by 1e-3 whenever it generates with a cache."""

    def forward(self, x: torch.Tensor, ctx: slmkit.BlockContext) -> torch.Tensor:
        out = super().forward(x, ctx)
        if ctx.cache is None:
            return out
        nudge = torch.zeros(out.shape[-1])
        nudge[0] = 1e-3  # not the same for every feature: LayerNorm would remove that
        return out + nudge


class RoundsOffInDecode(GPTBlock):
    """The gpt block, its fast decode step off by a relative 1e-7 (as an approximation is)."""

    def decoder(self) -> Callable[[torch.Tensor, slmkit.KVCache, int], torch.Tensor]:
        decode = super().decoder()

        def rounded_off(x: torch.Tensor, cache: slmkit.KVCache, position: int) -> torch.Tensor:
            out = decode(x, cache, position)
            return out + 1e-7 * out

        return rounded_off


class BrokenBlocks:
    """A plugin providing the blocks above."""

    @slmkit.hookimpl
    def register_blocks(self, register: slmkit.Register) -> None:
        register("drops_last_key", DropsLastKey, options=GPTOptions)
        register("never_appends", NeverAppends, options=GPTOptions)
        register("nudged", NudgedWhenCached, options=GPTOptions)
        register("rounds_off_in_decode", RoundsOffInDecode, options=GPTOptions)


# -- check_kv_cache --------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_the_gpt_block_passes_the_cache_check_within_the_default_tolerance(attention: str) -> None:
    model = testing.tiny_model("gpt", model={"attention": attention})
    worst = testing.check_kv_cache(model)
    assert 0.0 <= worst <= testing.DEFAULT_ATOL == 1e-5
    assert testing.DEFAULT_RTOL == 0.0
    assert not model.training  # left as it was: tiny_model builds in eval mode


def test_the_check_catches_a_cache_that_drops_the_last_key() -> None:
    model = testing.tiny_model("drops_last_key", [BrokenBlocks()])
    with pytest.raises(AssertionError) as info:
        testing.check_kv_cache(model)
    # token by token: position 0 sees its one key; position 1 misses itself
    assert str(info.value).startswith(
        "KV cache check, chunks [1, 1, 1, 1, 1, 1, 1, 1, ...]: the logits at position 1 "
        "differ from a full forward pass by "
    )
    # a prefill of 4 is right (no cache yet); its first single step is not
    with pytest.raises(AssertionError) as info:
        testing.check_kv_cache(model, chunks=[4, 1, 1])
    assert str(info.value).startswith(
        "KV cache check, chunks [4, 1, 1]: the logits at position 4 differ"
    )


def test_the_check_catches_a_block_that_never_appends() -> None:
    model = testing.tiny_model("never_appends", [BrokenBlocks()])
    with pytest.raises(AssertionError) as info:
        testing.check_kv_cache(model, chunks=[3, 2])
    assert str(info.value) == (
        "KV cache check, chunks [3, 2]: layer 0's cache holds 0 time steps after 5 tokens; "
        "a block must append each call's keys and values to ctx.cache (the model reads the "
        "next position from layer 0's cache)"
    )


def test_the_tolerance_is_atol_plus_rtol_times_the_logit() -> None:
    model = testing.tiny_model("nudged", [BrokenBlocks()])
    with pytest.raises(AssertionError, match=r"at position 0 differ .* \(atol 1e-05, rtol 0;"):
        testing.check_kv_cache(model)
    worst = testing.check_kv_cache(model, atol=0.5)
    assert 1e-5 < worst < 0.5
    # rtol alone: the same difference is allowed relative to the logits' size
    with pytest.raises(AssertionError, match=r"\(atol 0, rtol 1e-09;"):
        testing.check_kv_cache(model, atol=0.0, rtol=1e-9)
    assert testing.check_kv_cache(model, atol=0.0, rtol=1e3) == worst


# -- check_decode --------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("bias", [True, False])
def test_the_gpt_block_decodes_what_forward_computes_bit_for_bit(
    attention: str, bias: bool
) -> None:
    model = testing.tiny_model("gpt", model={"attention": attention, "bias": bias})
    testing.check_decode(model)
    testing.check_decode(model, batch=1, seed=3)
    assert not model.training


@pytest.mark.parametrize("block", ["nudged", "drops_last_key", "rounds_off_in_decode"])
def test_the_decode_check_catches_a_decode_that_is_not_forward(block: str) -> None:
    # nudged and drops_last_key change forward and not decode (the gpt block's); the
    # first decode step (position 1) already differs. A relative 1e-7 is caught too.
    model = testing.tiny_model(block, [BrokenBlocks()])
    with pytest.raises(AssertionError) as info:
        testing.check_decode(model)
    assert str(info.value).startswith(
        "decode check: logits at position 1 differ from forward's by "
    )


def test_the_check_refuses_chunks_past_the_context() -> None:
    model = testing.tiny_model(model={"context_length": 8})
    for chunks in ([4, 5], [0, 2], []):
        with pytest.raises(ValueError) as info:
            testing.check_kv_cache(model, chunks=chunks)
        assert str(info.value) == (
            "chunks must be positive sizes adding up to at most the context length (8), "
            f"got {chunks}"
        )


def test_default_schedules_cover_a_whole_window() -> None:
    assert testing.cache_schedules(8) == [[1] * 8, [4, 1, 1, 1, 1], [5, 3]]
    assert testing.cache_schedules(32)[2] == [5, 3, 1, 4, 1, 6, 5, 3, 1, 3]
    assert all(sum(s) == 32 for s in testing.cache_schedules(32))


def test_the_check_restores_training_mode() -> None:
    model = testing.tiny_model().train()
    testing.check_kv_cache(model, chunks=[2, 1])
    assert model.training


# -- tiny_model ------------------------------------------------------------------------------


def test_tiny_model_builds_the_named_block_with_its_options_from_a_plugin_object() -> None:
    model = testing.tiny_model("nudged", [BrokenBlocks()], model={"bias": False, "n_layers": 3})
    assert [type(b) for b in model.blocks] == [NudgedWhenCached] * 3
    assert model.blocks[0].attn.qkv.bias is None
    assert (model.dims.d_model, model.dims.n_heads, model.dims.vocab_size) == (32, 4, 64)
    again = testing.tiny_model("nudged", [BrokenBlocks()], model={"bias": False, "n_layers": 3})
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)  # seeded like a run


def test_tiny_model_reports_bad_input_as_the_kernel_does() -> None:
    with pytest.raises(slmkit.ConfigError) as info:
        testing.tiny_model(model={"attention": "flash"})
    assert str(info.value) == (
        "slmkit.testing: model.attention: must be one of 'sdpa', 'explicit', got 'flash'"
    )
    with pytest.raises(slmkit.ConfigError) as unknown:
        testing.tiny_model("nudged")  # the plugin providing it was not passed
    assert str(unknown.value).startswith("slmkit.testing: model.block: unknown block 'nudged'")
    with pytest.raises(slmkit.ConfigError, match="plugin 'slmkit-nowhere' is not installed"):
        testing.tiny_model("gpt", ["slmkit-nowhere"])


def test_load_plugin_reports_what_slmkit_plugins_shows() -> None:
    loaded = testing.load_plugin(BrokenBlocks(), "broken-blocks", version="1.0")
    assert loaded.name == "broken-blocks"
    assert loaded.error is None
    assert loaded.hooks == ["register_blocks"]
    assert loaded.provides == {
        "block": ["drops_last_key", "never_appends", "nudged", "rounds_off_in_decode"]
    }
    assert loaded.component("block", "nudged").factory is NudgedWhenCached
    assert loaded.component("block", "nudged").options is GPTOptions
    with pytest.raises(KeyError, match="registered no optimizer 'nudged'"):
        loaded.component("optimizer", "nudged")


def test_load_plugin_reports_a_broken_plugin_without_raising() -> None:
    class Misspelt:
        @slmkit.hookimpl
        def register_block(self, register: slmkit.Register) -> None:
            pass

    loaded = testing.load_plugin(Misspelt())
    assert loaded.name == "Misspelt"
    assert loaded.error == "unknown hook 'register_block' (did you mean 'register_blocks'?)"
    assert (loaded.provides, loaded.components) == ({}, [])


def test_testing_imports_without_pytest() -> None:
    script = textwrap.dedent(
        """\
        import sys
        sys.modules["pytest"] = None  # importing it now fails
        import slmkit.testing
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


# -- train_tiny and the contract it shows --------------------------------------------------------


class Recorder:
    """A plugin with a forward hook and run events that writes down what it sees."""

    default_points = ("blocks.0.hook_resid_post",)
    phases = ("train", "eval")

    def __init__(self) -> None:
        #: ``(phase, step, point, activation shape)`` of each observe call
        self.observed: list[tuple[str, int, str, tuple[int, ...]]] = []
        self.steps: list[int] = []
        self.run_dirs: list[Any] = []
        self.fail_at: int | None = None
        self._pending: list[tuple[str, tuple[int, ...]]] = []

    def observe(self, point: str, activation: torch.Tensor) -> None:
        self._pending.append((point, tuple(activation.shape)))

    def flush(self, step: int, phase: str) -> None:
        self.observed += [(phase, step, point, shape) for point, shape in self._pending]
        self._pending.clear()

    @slmkit.hookimpl
    def register_forward_hooks(self, register: slmkit.Register) -> None:
        register("recorder", lambda options: self)

    @slmkit.hookimpl
    def on_run_start(self, run: slmkit.Run) -> None:
        self.run_dirs.append(run.run_dir)

    @slmkit.hookimpl
    def on_step_end(self, step: int) -> None:
        self.steps.append(step)
        if step == self.fail_at:
            self.fail_at = None
            raise RuntimeError("power cut")


def test_train_tiny_returns_the_run_folder_losses_and_trained_model(tmp_path: Path) -> None:
    run = testing.train_tiny(steps=3, folder=tmp_path, seed=5)
    assert run.run_dir.parent == tmp_path / "runs"
    assert (tmp_path / "corpus.txt").read_text(encoding="utf-8") == testing.TINY_TEXT
    assert list(run.losses) == [1, 2, 3]
    assert run.losses == {e["step"]: e["train_loss"] for e in run.events("train_step")}
    assert run.summary["steps"] == 3 and run.summary["train_loss"] == run.losses[3]
    assert [e["step"] for e in run.events("eval")] == [3]
    saved = torch.load(run.run_dir / "checkpoints" / "step_3.pt", weights_only=True)["model"]
    assert all(torch.equal(p, saved[n]) for n, p in run.model.state_dict().items())
    assert not run.model.training
    assert run.events()[0]["event"] == "run_start" and run.events()[0]["seed"] == 5


def test_forward_hooks_watch_the_first_micro_batch_and_every_validation_batch(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    testing.train_tiny(
        [recorder], steps=2, folder=tmp_path,
        experiment={
            "training": {"grad_accum_steps": 3, "batch_size": 4, "eval_batches": 2},
            "forward_hooks": [{"name": "recorder"}],
        },
    )  # fmt: skip
    point, shape = "blocks.0.hook_resid_post", (4, 32, 32)
    assert recorder.observed == [
        ("train", 1, point, shape),  # one call per step: the first of 3 micro-batches
        ("train", 2, point, shape),
        ("eval", 2, point, shape),  # one call per validation batch
        ("eval", 2, point, shape),
    ]
    assert recorder.run_dirs == [recorder.run_dirs[0]]
    assert isinstance(recorder.run_dirs[0], Path)  # run.run_dir is a pathlib.Path


def test_run_events_repeat_for_steps_retrained_after_a_resume(tmp_path: Path) -> None:
    recorder = Recorder()
    recorder.fail_at = 3  # after step 3's events, before its checkpoint
    changes = {"training": {"checkpoint_every": 2}}
    with pytest.raises(slmkit.RunError, match="power cut at step 3"):
        testing.train_tiny([recorder], steps=4, folder=tmp_path, experiment=changes)
    (run_dir,) = (tmp_path / "runs").iterdir()
    log = (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
    first = [e for e in map(json.loads, log) if e["event"] == "train_step"]
    run = testing.train_tiny(
        [recorder], steps=4, folder=tmp_path, experiment=changes, resume=run_dir
    )
    assert run.run_dir == run_dir
    assert recorder.steps == [1, 2, 3, 3, 4]  # step 3 trained, and reported, twice
    assert len(recorder.run_dirs) == 2  # on_run_start: once per process
    steps = [e["step"] for e in run.events("train_step")]
    assert steps == [1, 2, 3, 3, 4]
    assert run.losses[3] == run.events("train_step")[3]["train_loss"]  # the latest wins
    assert [e["step"] for e in first] == [1, 2, 3]
