"""Corpus -> text -> train/validation split -> token tensors -> batches of windows.

The text is split by characters (first ``1 - val_fraction`` for training, the rest for
validation) before tokenizing, so a trained tokenizer never sees validation text. Each
split becomes one compact integer tensor, cut into non-overlapping windows of
``context_length + 1`` tokens: a window's first ``context_length`` tokens are the inputs,
its last ``context_length`` the targets. Training visits the windows in an order shuffled
afresh each epoch from the run seed and the epoch number, so the position in the stream is
one integer (windows consumed) and resumes exactly.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
import torch

from slmkit.components import Corpus, Tokenizer
from slmkit.errors import DataError


@attrs.define
class Splits:
    """The encoded corpus: training and validation token tensors and what they came from."""

    train: torch.Tensor
    val: torch.Tensor
    n_chars: int
    corpus_sha256: str
    #: tokens of both splits that are the tokenizer's ``unk_id`` (0 if it has none)
    unknown_tokens: int = 0
    #: where the validation text starts in the corpus text (characters)
    val_start: int = 0

    @property
    def chars_per_token(self) -> float:
        """Characters per token over the whole corpus (1.0 for the char tokenizer)."""
        return self.n_chars / (len(self.train) + len(self.val))


#: a share of ``<UNK>`` tokens above which a run warns that its corpus hardly fits the
#: tokenizer (the char tokenizer's ASCII policy, say, on a text in another script)
UNKNOWN_WARN_SHARE = 0.02


def read_corpus(corpus: Corpus) -> str:
    """The corpus's texts joined by newlines; an empty corpus or NUL characters are errors."""
    texts = list(corpus.texts())
    text = texts[0] if len(texts) == 1 else "\n".join(texts)
    if not text.strip():
        raise DataError("the corpus is empty")
    nul = text.find("\0")  # a fast scan, whatever corpus plugin the text came from
    if nul >= 0:
        raise DataError(
            f"the corpus contains NUL characters (the first at character {nul}): "
            "binary data, not text"
        )
    return text


def compact_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every id."""
    if vocab_size <= 256:
        return torch.uint8
    if vocab_size <= 2**15:
        return torch.int16
    return torch.int32


def encode(tokenizer: Tokenizer, text: str, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Encode ``text[start:end]`` to a compact 1-D tensor, through a fast path if any.

    A tokenizer with ``encode_span`` encodes the span where it lies; otherwise the span is
    sliced out (a copy that lives only while it is encoded).
    """
    end = len(text) if end is None else end
    dtype = compact_dtype(tokenizer.vocab_size)
    in_place = getattr(tokenizer, "encode_span", None)
    if in_place is not None:
        return in_place(text, start, end).to(dtype)
    span = text[start:end]  # the whole text is not copied: text[0:len(text)] is text
    fast = getattr(tokenizer, "encode_to_tensor", None)
    if fast is not None:
        return fast(span).to(dtype)
    return torch.tensor(tokenizer.encode(span), dtype=dtype)


def prepare_splits(
    text: str,
    tokenizer: Tokenizer,
    val_fraction: float,
    context_length: int,
    *,
    train_tokenizer: bool = True,
) -> Splits:
    """Split, train the tokenizer on the training part (unless told not to), encode both.

    The splits are encoded one after the other from ``text`` itself, so that at most one
    of them exists as a copy of the text at a time (none with ``encode_span``, and no
    training text for a tokenizer with ``needs_training = False``): for a large corpus,
    the text and its token tensors are then all that fills memory.

    Raises :class:`DataError` when either split is shorter than one window.
    """
    cut = int(len(text) * (1 - val_fraction))
    if train_tokenizer and getattr(tokenizer, "needs_training", True):
        tokenizer.train(text[:cut])  # the slice is freed as soon as training returns
    train, val = encode(tokenizer, text, 0, cut), encode(tokenizer, text, cut)
    window = context_length + 1
    for name, tokens in (("validation", val), ("training", train)):
        if len(tokens) < window:
            raise DataError(
                f"the {name} split has {len(tokens)} tokens, fewer than one window of "
                f"context_length + 1 = {window}; use a larger corpus, a shorter "
                "model.context_length or another data.val_fraction"
            )
    digest = text_sha256(text)
    unk = getattr(tokenizer, "unk_id", None)
    unknown = 0 if unk is None else count_equal(train, unk) + count_equal(val, unk)
    return Splits(
        train, val, n_chars=len(text), corpus_sha256=digest, unknown_tokens=unknown, val_start=cut
    )


def unknown_warning(splits: Splits) -> str | None:
    """A warning when more than :data:`UNKNOWN_WARN_SHARE` of the tokens are ``<UNK>``."""
    total = len(splits.train) + len(splits.val)
    share = splits.unknown_tokens / total
    if share <= UNKNOWN_WARN_SHARE:
        return None
    return (
        f"{splits.unknown_tokens:,} of the corpus's {total:,} tokens ({100 * share:.1f} %) are "
        f"<UNK>, more than {100 * UNKNOWN_WARN_SHARE:.0f} %: the tokenizer cannot spell much "
        "of this text (the char tokenizer keeps ASCII only); check the corpus's encoding "
        "and language, or use the bpe tokenizer"
    )


def count_equal(tokens: torch.Tensor, value: int, chunk: int = 1 << 22) -> int:
    """How many of the 1-D ``tokens`` equal ``value``, counted a chunk at a time.

    ``(tokens == value).sum()`` would make a bool copy of the whole split and sum it
    through an int64 copy: 9 bytes per token, 9x a uint8 split, at the memory peak.
    """
    return sum(
        int(torch.count_nonzero(tokens[start : start + chunk] == value))
        for start in range(0, len(tokens), chunk)
    )


def text_sha256(text: str, chunk: int = 1 << 18) -> str:
    """sha256 of the UTF-8 text, hashed in chunks so no full-size copy is made."""
    hasher = hashlib.sha256()
    for start in range(0, len(text), chunk):
        hasher.update(text[start : start + chunk].encode("utf-8", "surrogatepass"))
    return hasher.hexdigest()


def windows(tokens: torch.Tensor, context_length: int) -> torch.Tensor:
    """Non-overlapping windows of ``context_length + 1`` tokens, shape (n, context + 1)."""
    window = context_length + 1
    n = len(tokens) // window
    return tokens[: n * window].view(n, window)


def epoch_order(n_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """The window order of one epoch: a permutation fixed by the seed and the epoch."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n_windows, generator=generator)


class BatchStream:
    """Endless training batches; its state is the number of windows consumed.

    Under data parallelism every rank walks the same window order and takes its own
    disjoint share: each draw takes a global batch of ``batch_size * world_size`` windows,
    of which ``rank`` gets the ``rank``-th slice of ``batch_size``. The position (windows
    consumed, counted globally) is then the same on every rank.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        context_length: int,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.windows = windows(tokens, context_length)
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.consumed = 0
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def n_windows(self) -> int:
        """Windows per epoch."""
        return len(self.windows)

    def _next_indices(self) -> torch.Tensor:
        picked = []
        for _ in range(self.batch_size * self.world_size):
            epoch, offset = divmod(self.consumed, self.n_windows)
            if epoch != self._order_epoch:
                self._order, self._order_epoch = (
                    epoch_order(self.n_windows, self.seed, epoch),
                    epoch,
                )
            picked.append(self._order[offset])
            self.consumed += 1
        start = self.rank * self.batch_size
        return torch.stack(picked[start : start + self.batch_size])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``(inputs, targets)``, each ``(batch_size, context_length)`` int64."""
        batch = self.windows[self._next_indices()].long()
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """The stream position, for checkpoints."""
        return {"windows_consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""
        self.consumed = int(state["windows_consumed"])


def validation_batches(
    tokens: torch.Tensor, context_length: int, batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: the first ``max_batches`` batches of windows, in order."""
    all_windows = windows(tokens, context_length)[: batch_size * max_batches].long()
    return [(b[:, :-1], b[:, 1:]) for b in all_windows.split(batch_size)]


def rank_share(
    batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int, world_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of each batch: near-equal disjoint slices, empty ones left out."""
    if world_size == 1:
        return batches
    shares = []
    for x, y in batches:
        xs, ys = x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]
        if len(xs):
            shares.append((xs, ys))
    return shares
