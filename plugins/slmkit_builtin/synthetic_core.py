"""What every synthetic source shares: the alphabet, the corpus wrapper, the exact floor.

A source generates characters of a known probabilistic process and can say, for any
prefix, the true probability of every next character given *only that prefix* (the
Bayes-optimal predictor of a model that sees one window). The corpus's ``floor`` is the
mean negative log-likelihood of that predictor over the validation windows, cut exactly
as ``slmkit``'s data pipeline cuts them for the char tokenizer.

Every source starts from its stationary distribution, so the unseen past before any
window is distributed the same way wherever the window lies: the predictor marginalises
over it with that distribution, which is exactly what a model could know.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from typing import Any, Protocol

import attrs
import numpy as np

import slmkit

#: the characters sources draw from, in order: a source with alphabet n uses the first n
ALPHABET = "".join(
    (string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation, " ")
)
MAX_ALPHABET = len(ALPHABET)  # 95: every printable ASCII character
#: the largest probability table, in float64 values, that one forward pass holds at once
CHUNK_VALUES = 1 << 22


def alphabet_size(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Require 2 <= alphabet <= 95 (the printable ASCII characters)."""
    if not isinstance(value, int) or not 2 <= value <= MAX_ALPHABET:
        raise slmkit.OptionValueError(
            attribute.name,
            f"must be an integer in [2, {MAX_ALPHABET}] (the printable ASCII characters), "
            f"got {value!r}",
        )


def whole(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Require an integer (TOML integers only: 1.0 is refused)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise slmkit.OptionValueError(attribute.name, f"must be an integer, got {value!r}")


class Source(Protocol):
    """A known process over ``alphabet`` (characters coded 0..len-1)."""

    alphabet: str

    def generate(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """``size`` character codes, starting from the stationary distribution."""

    def predictive(self, prefix: np.ndarray) -> np.ndarray:
        """``(n, L)`` codes -> ``(n, L, A)``: ``[:, j]`` = P(next | ``prefix[:, : j + 1]``)."""

    def entropy_rate(self) -> tuple[float, bool]:
        """The entropy rate in nats per character, and whether it is exact."""


def dirichlet_rows(
    rng: np.random.Generator, concentration: float, rows: int, size: int
) -> np.ndarray:
    """``rows`` probability vectors of ``size`` entries from a symmetric Dirichlet.

    Drawn as normalised gammas floored at the smallest normal float64, so a very low
    concentration gives nearly deterministic rows but never an exact zero (which would
    break the chain's ergodicity).
    """
    gammas = np.maximum(rng.gamma(concentration, size=(rows, size)), np.finfo(np.float64).tiny)
    return gammas / gammas.sum(axis=1, keepdims=True)


def stationary(transition: np.ndarray) -> np.ndarray:
    """The stationary distribution of an irreducible row-stochastic matrix (exact solve)."""
    n = len(transition)
    system = transition.T - np.eye(n)
    system[-1] = 1.0  # replace one (redundant) balance equation by sum(pi) = 1
    rhs = np.zeros(n)
    rhs[-1] = 1.0
    pi = np.linalg.solve(system, rhs)
    pi = np.maximum(pi, 0.0)
    return pi / pi.sum()


def row_entropy(rows: np.ndarray) -> np.ndarray:
    """The entropy (nats) of each probability row."""
    safe = np.where(rows > 0, rows, 1.0)
    return -(rows * np.log(safe)).sum(axis=-1)


def estimated_rate(source: Source, seed: int, windows: int = 16, length: int = 1024) -> float:
    """The predictor's loss past position ``length // 4`` of long windows of a fresh sample.

    For sources whose entropy rate has no closed form (hidden states): the Bayes loss with
    hundreds of characters of context, an estimate of the rate from above.
    """
    codes = source.generate(windows * (length + 1), np.random.default_rng(seed))
    batch = codes.reshape(windows, length + 1)
    probs = source.predictive(batch[:, :-1])
    picked = np.take_along_axis(probs, batch[:, 1:, None], axis=2)[..., 0]
    return float(-np.log(picked[:, length // 4 :]).mean())


def floor_of(source: Source, codes: np.ndarray, context_length: int, n_windows: int) -> float:
    """Mean Bayes-optimal NLL (nats/char) of the targets of the first ``n_windows`` windows."""
    window = context_length + 1
    n = min(n_windows, len(codes) // window)
    if n < 1:
        raise slmkit.DataError(
            f"the validation text has {len(codes)} characters, fewer than one window of "
            f"context_length + 1 = {window}"
        )
    windows = codes[: n * window].reshape(n, window)
    chunk = max(1, CHUNK_VALUES // (context_length * len(source.alphabet)))
    total = 0.0
    for start in range(0, n, chunk):
        batch = windows[start : start + chunk]
        probs = source.predictive(batch[:, :-1])
        picked = np.take_along_axis(probs, batch[:, 1:, None].astype(np.int64), axis=2)
        total += float(-np.log(picked).sum())
    return total / (n * context_length)


class SyntheticCorpus:
    """A corpus generated from a known source, with an exact floor."""

    def __init__(self, name: str, source: Source, size: int, seed: int, options: Any) -> None:
        self.name, self.source, self.size, self.seed = name, source, size, seed
        self.options = attrs.asdict(options)
        self._text: str | None = None
        self._lookup = np.full(256, -1, dtype=np.int64)
        self._lookup[np.frombuffer(source.alphabet.encode("ascii"), dtype=np.uint8)] = np.arange(
            len(source.alphabet)
        )

    def describe(self) -> dict[str, Any]:
        """The source and every option that made it."""
        return {"source": self.name, **self.options}

    def text(self) -> str:
        """The generated text (generated once, on first use)."""
        if self._text is None:
            codes = self.source.generate(self.size, np.random.default_rng([self.seed, 1]))
            table = np.frombuffer(self.source.alphabet.encode("ascii"), dtype=np.uint8)
            self._text = table[codes].tobytes().decode("ascii")
        return self._text

    def texts(self) -> Iterator[str]:
        """The generated text, as one text."""
        yield self.text()

    def codes(self, text: str) -> np.ndarray:
        """Character codes of ``text``; a character outside the alphabet is an error."""
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        codes = self._lookup[raw]
        if len(raw) != len(text) or (codes < 0).any():
            raise slmkit.DataError(f"the text is not from the {self.name!r} source's alphabet")
        return codes

    def floor(self, val_text: str, context_length: int, n_windows: int) -> slmkit.Floor:
        """The exact floor of the first ``n_windows`` validation windows, and the entropy rate."""
        loss = floor_of(self.source, self.codes(val_text), context_length, n_windows)
        rate, exact = self.source.entropy_rate()
        targets = min(n_windows, len(val_text) // (context_length + 1)) * context_length
        return slmkit.Floor(
            val_loss=loss, entropy_rate=rate, entropy_rate_exact=exact, targets=targets
        )
