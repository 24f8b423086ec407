"""Evaluation and sampling: the validation loss, bits per character, generated text.

:func:`evaluate` and :func:`sample_text` serve ``slmkit eval`` and ``slmkit sample`` as
they serve training; :class:`Evaluator` is the validation pass of a training run (this
rank's share of the fixed batches, forward hooks watching, the run's precision).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from slmkit.components import Tokenizer
from slmkit.distributed import World
from slmkit.hooks import ForwardHooks
from slmkit.model import LanguageModel
from slmkit.progress import Console
from slmkit.run import Run

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def loss_sum(
    model: LanguageModel, batches: Batches, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over the target tokens (float64), and their count."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for x, y in batches:
        _, loss = model(x.to(device), y.to(device))
        assert loss is not None
        total += loss.double() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total, count


def evaluate(model: LanguageModel, batches: Batches, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats per token) over fixed validation batches."""
    total, count = loss_sum(model, batches, device)
    return float(total / count)


def bits_per_char(loss: float, chars_per_token: float) -> float:
    """Nats per token -> bits per character, comparable across tokenizers."""
    return loss / math.log(2) / chars_per_token


def sample_text(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float,
    seed: int,
    device: torch.device,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
) -> str:
    """Sample a continuation of ``prompt`` with a generator of its own, seeded by ``seed``."""
    ids = tokenizer.encode(prompt) or [tokenizer.pad_id or 0]
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k or None,
        top_p=top_p,
        generator=generator,
        use_cache=use_cache,
    )
    return tokenizer.decode(out[0, len(ids) :].tolist())


#: the most of a training sample the console shows, in lines and in characters (prompt
#: included); the ``sample`` event in the log holds the whole text
PREVIEW_LINES = 12
PREVIEW_CHARS = 600
#: what the shown lines of a sample start with
PREVIEW_INDENT = "    "


def sample_preview(text: str) -> str:
    """A sample as an indented block of its own lines, cut with "…" past the limits.

    Tabs are expanded and other control characters (a carriage return would redraw the
    line) shown escaped, so the block always reads as printed.
    """
    shown = "".join(
        c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text.expandtabs(4)
    ).strip("\n")
    cut = len(shown) > PREVIEW_CHARS
    lines = [line.rstrip() for line in shown[:PREVIEW_CHARS].split("\n")]
    if len(lines) > PREVIEW_LINES:
        lines, cut = lines[:PREVIEW_LINES], True
    if cut:
        lines[-1] += "…"
    if lines == [""]:
        lines = ["(empty)"]
    return "\n".join(PREVIEW_INDENT + line if line else "" for line in lines)


def log_sample(run: Run, step: int, console: Console) -> None:
    """The periodic sample of a training run: logged whole, shown as an indented block."""
    s = run.experiment.sampling
    text = sample_text(
        run.model,
        run.tokenizer,
        s.prompt,
        s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=run.experiment.experiment.seed + step,
        device=run.device,
    )
    run.log("sample", step=step, prompt=s.prompt, sample_text=text)
    console.say(f"step {step}: sample:\n{sample_preview(s.prompt + text)}")


class Evaluator:
    """The validation pass of a training run; under torchrun each rank evaluates its share."""

    def __init__(
        self,
        model: LanguageModel,
        batches: Batches,
        share: Batches,
        world: World,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
        forward_hooks: ForwardHooks | None = None,
    ) -> None:
        self.model, self.batches, self.share = model, batches, share
        self.world, self.device, self.autocast = world, device, autocast
        self.forward_hooks = forward_hooks

    def loss(self, run: Run, step: int) -> float:
        """The mean validation loss, forward hooks watching (``phase = "eval"``)."""
        hooks = self.forward_hooks
        watch = hooks.watching(run, "eval", step) if hooks else contextlib.nullcontext()
        with watch, self.autocast():
            if not self.world.launched:
                return evaluate(self.model, self.batches, self.device)
            total, count = loss_sum(self.model, self.share, self.device)
            sums = self.world.sum(torch.stack([total, total.new_tensor(float(count))]))
            return float(sums[0] / sums[1])
