"""The ``bpe`` tokenizer: byte-level byte-pair encoding, learned on the training text.

Vocabulary. Ids 0-255 are the 256 possible bytes of UTF-8. Every further id stands for
one learned *merge* ``(a, b) -> new id``, in the order the merges were learned: merge
``i`` makes id ``256 + i``, and its ``a`` and ``b`` are bytes or earlier merges. There is
no padding token (``pad_id`` is None) and no unknown token: every text is some sequence of
bytes, so everything encodes.

No normalization. ``encode`` works on ``text.encode("utf-8", "surrogatepass")`` and
``decode`` undoes it, so ``decode(encode(s)) == s`` for every Python ``str``, even one
with lone surrogates (which plain UTF-8 refuses). An id sequence that is not valid UTF-8
(a model can sample one) decodes with U+FFFD for each bad piece, as ``errors="replace"``
would; encoded surrogates still decode to themselves.

Training (the classic algorithm, as in minbpe's ``BasicTokenizer``, with no regex
pre-splitting): start from the text's bytes; count every adjacent pair (overlapping
ones too: "aaa" holds (a, a) twice); take the most frequent pair, ties going to the
smallest ``(a, b)``; replace its occurrences left to right, non-overlapping ("aaaa" ->
[aa, aa], "aaa" -> [aa, a]); repeat until ``vocab_size - 256`` merges are learned, or
stop early when no pair occurs twice. Counting every pair afresh after each merge would
cost a pass over the whole text per merge; instead the counts are updated from the
neighbourhood of the replaced occurrences only (see :func:`learn_merges`), and a heap
finds the most frequent pair.

Encoding (the greedy rank-ordered definition): repeatedly merge the pair of lowest rank
(earliest learned) present in the sequence, all its occurrences left to right. Merging
``(a, b)`` into ``t`` only creates pairs that contain ``t``, and those are merges learned
after ``t``, so this is the same as applying every merge once, in learned order, as one
vectorized pass over the (shrinking) byte array each. The training text encodes exactly
to the sequence training ended with.

``vocab_size`` is the configured size, which the model's embedding is built with; if
training stopped early, ids from ``256 + len(merges)`` on are never produced by
``encode`` and decode to U+FFFD.
"""

from __future__ import annotations

import codecs
import heapq
from collections.abc import Sequence
from typing import Any, TypeGuard

import attrs
import numpy as np
import torch

import slmkit

N_BYTES = 256
#: 0xFF never occurs in UTF-8: the bytes of an id no merge defines, decoded as U+FFFD
UNUSED_ID_BYTES = b"\xff"


# -- UTF-8 with surrogates: encode with surrogatepass, decode with surrogatepass-or-replace


def _surrogatepass_or_replace(exc: UnicodeError) -> tuple[str | bytes, int]:
    """Decode an encoded lone surrogate to itself; anything else invalid to U+FFFD."""
    try:
        return codecs.lookup_error("surrogatepass")(exc)
    except UnicodeDecodeError:
        return codecs.replace_errors(exc)


codecs.register_error("slmkit-bpe", _surrogatepass_or_replace)


def text_to_bytes(text: str) -> bytes:
    """The UTF-8 bytes of ``text``; lone surrogates as their 3-byte encoding."""
    return text.encode("utf-8", "surrogatepass")


def bytes_to_text(data: bytes) -> str:
    """Undo :func:`text_to_bytes`; invalid UTF-8 becomes U+FFFD."""
    return data.decode("utf-8", "slmkit-bpe")


# -- the one operation everything is made of: merge every (a, b) into t -------------------


def merge_positions(ids: np.ndarray, a: int, b: int) -> np.ndarray:
    """Where ``(a, b)`` starts, left to right and non-overlapping.

    Matches can only overlap when ``a == b``: in a run of ``a`` (matches at i, i+1, i+2...)
    the left-to-right rule keeps every other match, counting from the start of the run.
    """
    starts = np.flatnonzero((ids[:-1] == a) & (ids[1:] == b))
    if a != b or len(starts) < 2:
        return starts
    # index (within `starts`) of the first match of each run of consecutive matches
    new_run = np.ones(len(starts), dtype=bool)
    new_run[1:] = starts[1:] != starts[:-1] + 1
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(starts)), 0))
    return starts[(np.arange(len(starts)) - run_start) % 2 == 0]


def apply_merge(ids: np.ndarray, positions: np.ndarray, t: int) -> np.ndarray:
    """Replace the pair at each of ``positions`` by ``t`` (a new, shorter array)."""
    out = ids.copy()
    out[positions] = t
    keep = np.ones(len(ids), dtype=bool)
    keep[positions + 1] = False
    return out[keep]


def _neighbour_starts(ids: np.ndarray, positions: np.ndarray, offsets: Sequence[int]) -> np.ndarray:
    """Start indices of the pairs at ``positions + offset`` for each offset, each once."""
    starts = np.unique(np.concatenate([positions + o for o in offsets]))
    return starts[(starts >= 0) & (starts < len(ids) - 1)]


def _pair_keys(ids: np.ndarray, starts: np.ndarray, base: int) -> np.ndarray:
    """Keys ``a * base + b`` of the pairs starting at ``starts``."""
    return ids[starts].astype(np.int64) * base + ids[starts + 1].astype(np.int64)


def ids_dtype(vocab_size: int) -> type[np.signedinteger[Any]]:
    """The smallest integer dtype that holds every id (``torch`` has no uint16 arithmetic)."""
    if vocab_size <= 2**15:
        return np.int16
    return np.int32 if vocab_size <= 2**31 else np.int64


# -- training ----------------------------------------------------------------------------


def learn_merges(data: bytes, n_merges: int, base: int) -> list[tuple[int, int]]:
    """Learn up to ``n_merges`` merges on ``data`` (see the module docstring).

    ``base`` (the vocabulary size) packs a pair into one integer key ``a * base + b``, so
    "smallest key" is "smallest ``(a, b)``", the tie-break.

    Why the incremental counts are exact: a merge rewrites only the two ids of each
    occurrence it replaces. A pair that touches neither survives unchanged (and stays
    adjacent: the only id removed lies inside a replaced occurrence), so the counts change
    only for the old pairs that touch a replaced occurrence, which go, and the new pairs
    that touch a new token, which come. Each merge costs one vectorized scan for the
    occurrences plus work proportional to their number, not a full recount.
    """
    ids = np.frombuffer(data, dtype=np.uint8).astype(ids_dtype(base))
    if len(ids) < 2 or n_merges <= 0:
        return []
    # counts: pair key -> occurrences (overlapping ones too), for pairs that occur
    keys, n = np.unique(_pair_keys(ids, np.arange(len(ids) - 1), base), return_counts=True)
    counts: dict[int, int] = dict(zip(keys.tolist(), n.tolist(), strict=True))
    # a max-heap of (-count, key); entries whose count has since changed are stale and
    # skipped when they reach the top (every change pushes a fresh entry)
    heap = [(-c, k) for k, c in counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges and heap:
        neg_count, key = heapq.heappop(heap)
        if counts.get(key, 0) != -neg_count:
            continue  # stale
        if -neg_count < 2:
            break  # no pair occurs twice: another merge would not shorten anything
        a, b = divmod(key, base)
        t = N_BYTES + len(merges)
        merges.append((a, b))

        positions = merge_positions(ids, a, b)
        # the pairs that change are those touching a replaced occurrence: before the
        # merge, the pairs starting one before, at and one after it; after the merge,
        # those starting one before and at the new token (everything else is unchanged)
        old = _pair_keys(ids, _neighbour_starts(ids, positions, (-1, 0, 1)), base)
        ids = apply_merge(ids, positions, t)
        new_positions = positions - np.arange(len(positions))  # each merge drops one id
        new = _pair_keys(ids, _neighbour_starts(ids, new_positions, (-1, 0)), base)

        delta: dict[int, int] = {}
        for keys, sign in ((old, -1), (new, 1)):
            changed, n = np.unique(keys, return_counts=True)
            for k, c in zip(changed.tolist(), n.tolist(), strict=True):
                delta[k] = delta.get(k, 0) + sign * c
        for k, d in delta.items():
            if d == 0:
                continue
            c = counts.get(k, 0) + d
            if c:
                counts[k] = c
                heapq.heappush(heap, (-c, k))
            else:
                del counts[k]
    return merges


# -- the tokenizer -----------------------------------------------------------------------


class BPETokenizer:
    """Byte-level BPE (see the module docstring for the algorithm and the policy)."""

    pad_id: int | None = None

    def __init__(self, vocab_size: int = 512) -> None:
        self.vocab_size = vocab_size
        self.merges: list[tuple[int, int]] = []
        self._rebuild()

    def _rebuild(self) -> None:
        """The id -> bytes table, from the bytes and the merges."""
        table = [bytes([i]) for i in range(N_BYTES)]
        for a, b in self.merges:
            table.append(table[a] + table[b])
        table += [UNUSED_ID_BYTES] * (self.vocab_size - len(table))
        self._bytes_of = table

    def train(self, text: str) -> None:
        """Learn ``vocab_size - 256`` merges on ``text`` (fewer if no pair repeats)."""
        self.merges = learn_merges(text_to_bytes(text), self.vocab_size - N_BYTES, self.vocab_size)
        self._rebuild()

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` (no normalization), as :meth:`encode_to_tensor`."""
        return self.encode_to_tensor(text).tolist()

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        """Encode ``text`` into a 1-D integer tensor: every merge in learned order."""
        ids = np.frombuffer(text_to_bytes(text), dtype=np.uint8).astype(ids_dtype(self.vocab_size))
        for t, (a, b) in enumerate(self.merges, start=N_BYTES):
            if len(ids) < 2:
                break
            positions = merge_positions(ids, a, b)
            if len(positions):
                ids = apply_merge(ids, positions, t)
        return torch.from_numpy(ids)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids back to text; invalid UTF-8 and unused ids decode to U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        bytes_of = self._bytes_of
        return bytes_to_text(b"".join(bytes_of[i] for i in ids))

    def state_dict(self) -> dict[str, Any]:
        """The vocabulary size and the merges in learned order, as JSON values."""
        return {"vocab_size": self.vocab_size, "merges": [[a, b] for a, b in self.merges]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved vocabulary; ValueError if it is malformed."""
        if not isinstance(state, dict):
            raise ValueError(f"bpe tokenizer state must be an object, got {type(state).__name__}")
        vocab_size, merges = state.get("vocab_size"), state.get("merges")
        if not _is_int(vocab_size) or vocab_size <= N_BYTES:
            raise ValueError(f"bpe tokenizer state: vocab_size must be an integer >= 257, "
                             f"got {vocab_size!r}")  # fmt: skip
        if not isinstance(merges, list) or len(merges) > vocab_size - N_BYTES:
            raise ValueError(
                f"bpe tokenizer state: merges must be a list of at most vocab_size - 256 = "
                f"{vocab_size - N_BYTES} pairs"
            )
        checked = []
        for i, pair in enumerate(merges):
            # merge i makes id 256 + i from bytes and earlier merges only
            if not (
                isinstance(pair, list | tuple)
                and len(pair) == 2
                and all(_is_int(x) and 0 <= x < N_BYTES + i for x in pair)
            ):
                raise ValueError(
                    f"bpe tokenizer state: merges[{i}] must be a pair of ids below "
                    f"{N_BYTES + i}, got {pair!r}"
                )
            checked.append((int(pair[0]), int(pair[1])))
        self.vocab_size, self.merges = vocab_size, checked
        self._rebuild()


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _at_least_257(_instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < N_BYTES + 1:
        raise slmkit.OptionValueError(
            attribute.name,
            f"must be >= 257 (the 256 byte tokens and at least one merge), got {value!r}",
        )


@attrs.define(frozen=True)
class BPEOptions:
    """Options of the ``bpe`` tokenizer (keys of the ``[tokenizer]`` table)."""

    #: 256 byte tokens plus the number of merges to learn
    vocab_size: int = attrs.field(default=512, validator=_at_least_257)


@slmkit.hookimpl
def register_tokenizers(register: slmkit.Register) -> None:
    """Provide the ``bpe`` tokenizer."""
    register("bpe", lambda options: BPETokenizer(options.vocab_size), options=BPEOptions)
