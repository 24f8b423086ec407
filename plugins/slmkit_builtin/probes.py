"""Built-in probes: ``induction``, ``previous_token``, ``logit_lens``, ``attention_entropy``.

Each measures the model on a fixed batch of its own, drawn once with the generator the
kernel seeds from the ``[[probes]]`` table's ``seed``: ``induction`` on random token
sequences repeated once, the other three on windows of the validation text. A batch of
``time`` tokens is read as the model reads training windows: the first ``time - 1`` are
the input, the last ``time - 1`` the targets.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

import slmkit
from slmkit_builtin.forward_hooks import head_entropy

PATTERN = "blocks.*.attn.hook_pattern"
RESIDUAL = "blocks.*.hook_resid_post"


@attrs.define(frozen=True)
class InductionOptions:
    """Options of ``induction``."""

    #: random sequences in the batch
    batch_size: int = attrs.field(default=16, validator=slmkit.positive)
    #: tokens of each random sequence, which is then repeated once (0: as many as the
    #: context allows, (context_length + 1) // 2)
    seq_len: int = attrs.field(default=0, validator=slmkit.non_negative)


@attrs.define(frozen=True)
class TextOptions:
    """Options of the probes that read validation text."""

    #: windows of validation text in the batch
    batch_size: int = attrs.field(default=8, validator=slmkit.positive)
    #: positions of each window the model reads (0: the context length)
    seq_len: int = attrs.field(default=0, validator=slmkit.non_negative)


def random_sequences(setup: slmkit.ProbeSetup, batch: int, length: int) -> torch.Tensor:
    """``(batch, length)`` random ids of tokens the validation split holds, never padding.

    Tokens the corpus never shows (most of a character vocabulary, for a small synthetic
    alphabet) were pushed down in training whatever the model learnt; drawing them would
    keep the repeated half's loss high even under a working induction head. Within a row
    no token repeats when there are enough of them, so a token's earlier occurrence in a
    repeated sequence is one position.
    """
    pad = setup.tokenizer.pad_id
    seen = torch.unique(setup.val_tokens.long())
    if pad is not None:
        seen = seen[seen != pad]
    if len(seen) == 0:  # no validation text: any id but padding
        seen = torch.tensor([i for i in range(setup.dims.vocab_size) if i != pad])
    if length <= len(seen):
        rows = [torch.randperm(len(seen), generator=setup.generator)[:length] for _ in range(batch)]
        picks = torch.stack(rows)
    else:
        picks = torch.randint(len(seen), (batch, length), generator=setup.generator)
    return seen[picks]


def validation_windows(setup: slmkit.ProbeSetup, options: TextOptions) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len + 1`` validation tokens at random offsets."""
    context = setup.dims.context_length
    length = options.seq_len or context
    if not 2 <= length <= context:
        raise slmkit.OptionValueError(
            "seq_len", f"must be in [2, context_length = {context}] (0: {context}), got {length}"
        )
    tokens = setup.val_tokens
    starts = len(tokens) - length  # offsets where a window of length + 1 tokens fits
    if starts < 1:
        raise slmkit.OptionValueError(
            "seq_len",
            f"the validation split has {len(tokens)} tokens, too few for a window of "
            f"{length + 1}; use a smaller seq_len",
        )
    offsets = torch.randint(starts, (options.batch_size,), generator=setup.generator)
    return torch.stack([tokens[i : i + length + 1] for i in offsets.tolist()])


def inputs_and_targets(probe: slmkit.ProbeContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch read as training windows: positions ``:-1`` in, ``1:`` the targets."""
    return probe.tokens[:, :-1], probe.tokens[:, 1:]


class Induction:
    """Per-head induction score and the in-context loss drop, on repeated random tokens.

    Each row is a random sequence of ``L`` tokens followed by the same sequence again.
    The score of a head is its mean attention, from each position ``L + i`` of the
    repeat to ``i + 1``, the position just after the earlier occurrence of its token: the
    token an induction head copies. ``loss_first_half`` is the loss on tokens 1..L-1 (not
    predictable from anything before), ``loss_repeat_half`` on tokens L+1..2L-1 (a copy
    of the first half), ``loss_drop`` their difference (Olsson et al., 2022).
    """

    points = (PATTERN,)

    def __init__(self, options: InductionOptions) -> None:
        self.options = options

    def inputs(self, setup: slmkit.ProbeSetup) -> torch.Tensor:
        """The random sequences, each twice in a row."""
        most = (setup.dims.context_length + 1) // 2
        length = self.options.seq_len or most
        if not 2 <= length <= most:
            raise slmkit.OptionValueError(
                "seq_len",
                f"must be in [2, {most}] (the sequence and its repeat fit in context_length "
                f"+ 1 tokens; 0: {most}), got {length}",
            )
        first = random_sequences(setup, self.options.batch_size, length)
        return torch.cat([first, first], dim=1)

    def measure(self, probe: slmkit.ProbeContext) -> dict[str, Any]:
        """``score`` ``[layer][head]``, the two halves' losses and ``loss_drop``."""
        x, y = inputs_and_targets(probe)
        length = probe.tokens.shape[1] // 2
        logits, patterns = probe.forward(x)
        i = torch.arange(length - 1, device=x.device)
        score = torch.stack(
            [p[:, :, length + i, i + 1].mean(dim=(0, 2)) for p in patterns.values()]
        )
        first = probe.loss(logits[:, : length - 1], y[:, : length - 1]).item()
        repeat = probe.loss(logits[:, length:], y[:, length:]).item()
        return {
            "score": score,
            "loss_first_half": first,
            "loss_repeat_half": repeat,
            "loss_drop": first - repeat,
        }


class TextProbe:
    """A probe that reads windows of the validation text."""

    points: tuple[str, ...] = ()

    def __init__(self, options: TextOptions) -> None:
        self.options = options

    def inputs(self, setup: slmkit.ProbeSetup) -> torch.Tensor:
        """``batch_size`` validation windows, the same at every evaluation."""
        return validation_windows(setup, self.options)


class PreviousToken(TextProbe):
    """Per-head mean attention from each position to the one just before it.

    Position 0, which has no previous position, is left out: a head that always attends
    to the previous token scores 1.
    """

    points = (PATTERN,)

    def measure(self, probe: slmkit.ProbeContext) -> dict[str, Any]:
        """``score`` ``[layer][head]``."""
        x, _ = inputs_and_targets(probe)
        _, patterns = probe.forward(x)
        t = torch.arange(1, x.shape[1], device=x.device)
        return {
            "score": torch.stack([p[:, :, t, t - 1].mean(dim=(0, 2)) for p in patterns.values()])
        }


class LogitLens(TextProbe):
    """Per layer, the loss of the residual stream after that block, read by the model's head.

    Each block's output goes through the final norm and the head, as the last block's does
    (nostalgebraist, 2020): how far towards its final prediction the model is at each
    depth. The last layer's loss is the model's own loss on the batch.
    """

    points = (RESIDUAL,)

    def measure(self, probe: slmkit.ProbeContext) -> dict[str, Any]:
        """``loss``: one value per layer (nats per token)."""
        x, y = inputs_and_targets(probe)
        _, residuals = probe.forward(x)
        losses = [probe.loss(probe.readout(r), y) for r in residuals.values()]
        return {"loss": torch.stack(losses)}


class AttentionEntropyProbe(TextProbe):
    """Per-head mean entropy (nats) of the attention distributions, on validation windows.

    The forward hook of the same name measures training batches; this probe measures the
    same batch at every evaluation, so its values over a run compare like with like.
    """

    points = (PATTERN,)

    def measure(self, probe: slmkit.ProbeContext) -> dict[str, Any]:
        """``entropy`` ``[layer][head]``."""
        x, _ = inputs_and_targets(probe)
        _, patterns = probe.forward(x)
        return {"entropy": torch.stack([head_entropy(p) for p in patterns.values()])}


@slmkit.hookimpl
def register_probes(register: slmkit.Register) -> None:
    """Provide ``induction``, ``previous_token``, ``logit_lens`` and ``attention_entropy``."""
    register("induction", Induction, options=InductionOptions)
    register("previous_token", PreviousToken, options=TextOptions)
    register("logit_lens", LogitLens, options=TextOptions)
    register("attention_entropy", AttentionEntropyProbe, options=TextOptions)
