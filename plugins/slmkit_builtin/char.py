"""The ``char`` tokenizer: one token per character under a fixed ASCII policy.

Policy: the vocabulary is ``<PAD>`` (0), ``<UNK>`` (1), tab, newline and the printable
ASCII characters 32-126: 99 tokens, the same on every machine, so nothing is trained.
Text is normalized before encoding (see :func:`normalize`); any character still outside
the policy encodes to ``<UNK>``, which decodes to U+FFFD.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch

import slmkit

PAD_ID, UNK_ID = 0, 1
SPECIALS = ("<PAD>", "<UNK>")
ALPHABET = "\t\n" + "".join(chr(c) for c in range(32, 127))
UNK_TEXT = "\ufffd"

# Typographic characters that have an obvious ASCII spelling. NFKD already turns the
# ellipsis into "..." and non-breaking spaces into spaces; these it leaves alone.
TYPOGRAPHIC = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u2033": '"',
        "\u00ab": '"',
        "\u00bb": '"',
        "\u2039": "'",
        "\u203a": "'",
        "\u2010": "-",
        "\u2011": "-",
        "\u2012": "-",
        "\u2013": "-",
        "\u2014": "-",
        "\u2015": "-",
        "\u2212": "-",
        "\u00ad": "",
        "\u200b": "",
        "\ufeff": "",
        "\u2022": "*",
        "\u00b7": "*",
    }
)
# Letters that decomposition leaves whole but that have a conventional ASCII spelling.
LETTERS = str.maketrans(
    {
        "ß": "ss",
        "æ": "ae",
        "Æ": "AE",
        "œ": "oe",
        "Œ": "OE",
        "ø": "o",
        "Ø": "O",
        "đ": "d",
        "Đ": "D",
        "ł": "l",
        "Ł": "L",
        "ı": "i",
    }
)
# Characters normalized and encoded per step. It bounds the temporaries (a few copies of
# one chunk, 1-4 bytes a character) to about a MB, whatever the size of the text; per-chunk
# overhead is still negligible at this size.
_CHUNK = 1 << 18


def normalize(text: str) -> str:
    """Map text onto the policy's alphabet as far as it has an ASCII spelling.

    Line endings become ``\\n``; Unicode is decomposed (NFKD) and combining accents are
    dropped; curly quotes, dashes and similar map to ASCII. Idempotent. Characters with no
    ASCII spelling stay as they are (they encode to ``<UNK>``).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        return text
    # Only the non-ASCII runs need work; decomposition and the table act per character,
    # and the combining marks that reordering could move are dropped anyway.
    table = _ascii_spellings()
    return _NON_ASCII.sub(lambda run: unicodedata.normalize("NFKD", run[0]).translate(table), text)


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


@functools.cache
def _ascii_spellings() -> dict[int, str | None]:
    """One table for after decomposition: drop combining marks ("é" -> "e" + accent ->
    "e"), spell typographic characters and a few letters in ASCII."""
    table: dict[int, str | None] = dict.fromkeys(
        c for c in range(0x110000) if unicodedata.combining(chr(c))
    )
    return {**table, **TYPOGRAPHIC, **LETTERS}


class CharTokenizer:
    """The char tokenizer (see the module docstring for the policy)."""

    pad_id: int | None = PAD_ID
    #: what characters outside the policy encode to (counted by the kernel, which warns)
    unk_id: int | None = UNK_ID
    #: the vocabulary is fixed: the data pipeline need not copy out a training text
    needs_training = False

    def __init__(self) -> None:
        self.tokens: list[str] = [*SPECIALS, *ALPHABET]
        self.vocab_size = len(self.tokens)
        self._id_of = {ch: i for i, ch in enumerate(self.tokens) if i >= len(SPECIALS)}
        # byte -> id for bytes.translate (one C pass, no wider copy); any byte that is not
        # a character of the alphabet, NUL included, maps to <UNK>
        table = bytearray([UNK_ID]) * 256
        for ch, i in self._id_of.items():
            table[ord(ch)] = i
        self._byte_table = bytes(table)
        self._text_of = ["", UNK_TEXT, *ALPHABET]

    def train(self, text: str) -> None:
        """Nothing to learn: the vocabulary is fixed by the policy."""

    def encode(self, text: str) -> list[int]:
        """Normalize and encode ``text``, one id per character."""
        return self.encode_to_tensor(text).tolist()

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        """Normalize and encode ``text`` into a uint8 tensor, one id per character."""
        return self.encode_span(text, 0, len(text))

    def encode_span(self, text: str, start: int, end: int) -> torch.Tensor:
        """Normalize and encode ``text[start:end]`` into a uint8 tensor, without copying it.

        The span is encoded chunk by chunk into one tensor allocated up front: normalizing
        rarely changes the number of characters, so the output is sized to the span and
        grows only when it must ("ß" -> "ss"); otherwise no copy is larger than a chunk.
        Normalization is per character, so chunking changes nothing, as long as a
        ``\r\n`` pair is never cut in two.
        """
        out = torch.empty(end - start, dtype=torch.uint8)
        filled = 0
        while start < end:
            stop = min(start + _CHUNK, end)
            if stop < end and text[stop - 1 : stop + 1] == "\r\n":
                stop += 1  # keep the pair together: it normalizes to one newline
            ids = self._ids(normalize(text[start:stop]))
            if filled + len(ids) > len(out):
                # normalization lengthened the text: room for this chunk, the rest, 1/8 more
                grown = torch.empty(
                    filled + len(ids) + (end - stop) + len(out) // 8, dtype=torch.uint8
                )
                grown[:filled] = out[:filled]
                out = grown
            out.numpy()[filled : filled + len(ids)] = np.frombuffer(ids, dtype=np.uint8)
            filled += len(ids)
            start = stop
        return out[:filled]

    def _ids(self, normalized: str) -> bytes:
        """The ids of normalized text, one byte per character."""
        if not normalized.isascii():
            # What normalization left outside ASCII has no spelling: one <UNK> per
            # character, through NUL (which the table maps to <UNK>), so that the rest
            # goes through bytes.translate, one C pass with no temporary wider than a byte.
            normalized = _NON_ASCII.sub(lambda run: "\0" * len(run[0]), normalized)
        return normalized.encode("ascii").translate(self._byte_table)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids back to text; ``<PAD>`` decodes to nothing, ``<UNK>`` to U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text_of = self._text_of
        return "".join(text_of[i] for i in ids)

    def state_dict(self) -> dict[str, Any]:
        """The vocabulary, for ``tokenizer.json`` (it is fixed, but written for readers)."""
        return {"policy": "ascii-printable+tab+newline", "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that a saved vocabulary is this policy's."""
        if state.get("tokens") != self.tokens:
            raise ValueError("tokenizer.json does not hold the char policy's vocabulary")


@attrs.define(frozen=True)
class CharOptions(slmkit.NoOptions):
    """The char tokenizer takes no options: its policy is fixed."""


@slmkit.hookimpl
def register_tokenizers(register: slmkit.Register) -> None:
    """Provide the ``char`` tokenizer."""
    register("char", lambda options: CharTokenizer(), options=CharOptions)
