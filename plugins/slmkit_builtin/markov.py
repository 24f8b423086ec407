"""The ``markov`` source: an order-k Markov chain over a printable-ASCII alphabet.

Each of the ``alphabet ** order`` histories has a row of next-character probabilities
drawn from a symmetric Dirichlet (``concentration``: low, nearly deterministic; high,
nearly uniform). The text starts from the stationary distribution of k-grams, so inside a
window the first ``order`` characters are predicted from the stationary marginals of the
shorter history the window shows; later ones from the transition rows.
"""

from __future__ import annotations

import bisect

import attrs
import numpy as np

import slmkit
from slmkit_builtin.synthetic_core import ALPHABET as CHARS
from slmkit_builtin.synthetic_core import (
    alphabet_size,
    dirichlet_rows,
    row_entropy,
    stationary,
    whole,
)

#: the most k-gram histories a chain may have (its stationary distribution is solved densely)
MAX_HISTORIES = 4096


@attrs.define(frozen=True)
class MarkovOptions:
    """Options of the ``markov`` corpus (keys of the ``[data]`` table)."""

    #: characters generated
    size: int = attrs.field(default=1_000_000, validator=[whole, slmkit.positive])
    #: characters used: the first ``alphabet`` of a-z, A-Z, 0-9, punctuation, space (<= 95)
    alphabet: int = attrs.field(default=16, validator=alphabet_size)
    #: characters of history each next character depends on
    order: int = attrs.field(default=1, validator=[whole, slmkit.positive])
    #: Dirichlet concentration of the transition rows
    concentration: float = attrs.field(default=0.5, validator=slmkit.positive)
    #: seed of the chain and of the text
    seed: int = attrs.field(default=0, validator=[whole, slmkit.non_negative])

    def __attrs_post_init__(self) -> None:
        if self.alphabet**self.order > MAX_HISTORIES:
            raise slmkit.OptionValueError(
                "order",
                f"alphabet ** order = {self.alphabet}**{self.order} histories is more than "
                f"{MAX_HISTORIES}; use a smaller order or alphabet",
            )


class MarkovSource:
    """An order-k chain; histories are coded most-significant first: sum x_i A^(k-1-i)."""

    def __init__(self, options: MarkovOptions) -> None:
        self.alphabet = CHARS[: options.alphabet]
        self.order = options.order
        size, histories = options.alphabet, options.alphabet**options.order
        rng = np.random.default_rng([options.seed, 0])
        self.rows = dirichlet_rows(rng, options.concentration, histories, size)
        self.pi = stationary(self.history_transition())
        #: marginals[m]: distribution of m consecutive characters (coded), m = 0..order
        self.marginals = [
            self.pi.reshape(size**m, size ** (self.order - m)).sum(axis=1)
            for m in range(self.order + 1)
        ]

    def history_transition(self) -> np.ndarray:
        """The chain on k-gram histories: h -> (h without its first char) + next char."""
        size, histories = len(self.alphabet), len(self.rows)
        matrix = np.zeros((histories, histories))
        h = np.arange(histories)
        for c in range(size):
            matrix[h, (h * size) % histories + c] += self.rows[:, c]
        return matrix

    def generate(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """A stationary run of the chain: the first k-gram from pi, then the rows."""
        a, k, histories = len(self.alphabet), self.order, len(self.rows)
        first = int(rng.choice(histories, p=self.pi))
        start = [(first // a ** (k - 1 - i)) % a for i in range(k)]
        cumulative = [row.tolist() for row in np.cumsum(self.rows, axis=1)]
        uniforms = rng.random(max(0, size - k)).tolist()
        out = start[:size]
        h = first
        for u in uniforms:  # one step depends on the last: sequential by nature
            row = cumulative[h]
            c = min(bisect.bisect_right(row, u * row[-1]), a - 1)
            out.append(c)
            h = (h * a) % histories + c
        return np.asarray(out, dtype=np.int64)

    def predictive(self, prefix: np.ndarray) -> np.ndarray:
        """P(next | the prefix so far) for every position of every prefix."""
        n, length = prefix.shape
        a, k = len(self.alphabet), self.order
        probs = np.empty((n, length, a))
        history = np.zeros(n, dtype=np.int64)
        for j in range(length):
            seen = j + 1  # characters of the window seen when predicting the next one
            history = history * a + prefix[:, j]
            if seen >= k:
                history %= a**k
                probs[:, j] = self.rows[history]
            else:  # the window shows only `seen` characters: marginalise the rest
                joint = self.marginals[seen + 1].reshape(a**seen, a)[history]
                probs[:, j] = joint / joint.sum(axis=1, keepdims=True)
        return probs

    def entropy_rate(self) -> tuple[float, bool]:
        """sum over histories of pi(h) H(row h): exact."""
        return float(self.pi @ row_entropy(self.rows)), True
