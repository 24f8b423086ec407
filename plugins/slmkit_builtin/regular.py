"""The ``regular`` source: a random probabilistic finite automaton (a regular language).

``states`` states; each allows ``branching`` distinct characters, with probabilities from
a Dirichlet (``concentration``), and each allowed character leads to a fixed next state.
The first allowed character of state q leads to q + 1, so every state is reachable and the
stationary distribution is unique. The language is the set of strings the automaton can
emit. The state is hidden at a window's start (the belief starts stationary) and is pinned
down by the characters seen; the entropy rate is exact because the automaton is
deterministic given its characters (unifilar).
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

MAX_STATES = 256


@attrs.define(frozen=True)
class RegularOptions:
    """Options of the ``regular`` corpus (keys of the ``[data]`` table)."""

    #: characters generated
    size: int = attrs.field(default=1_000_000, validator=[whole, slmkit.positive])
    #: characters used: the first ``alphabet`` of a-z, A-Z, 0-9, punctuation, space (<= 95)
    alphabet: int = attrs.field(default=8, validator=alphabet_size)
    #: states of the automaton (1 to 256)
    states: int = attrs.field(default=6, validator=[whole, slmkit.in_range(1, MAX_STATES)])
    #: characters each state allows (1 to alphabet)
    branching: int = attrs.field(default=3, validator=[whole, slmkit.positive])
    #: Dirichlet concentration of each state's character probabilities
    concentration: float = attrs.field(default=1.0, validator=slmkit.positive)
    #: seed of the automaton and of the text
    seed: int = attrs.field(default=0, validator=[whole, slmkit.non_negative])

    def __attrs_post_init__(self) -> None:
        if self.branching > self.alphabet:
            raise slmkit.OptionValueError(
                "branching",
                f"must be at most alphabet = {self.alphabet}, got {self.branching}",
            )


class RegularSource:
    """``emission`` (Q, A) with zeros outside each state's characters; ``next_state`` (Q, A)."""

    def __init__(self, options: RegularOptions) -> None:
        self.alphabet = CHARS[: options.alphabet]
        q, a = options.states, options.alphabet
        rng = np.random.default_rng([options.seed, 0])
        self.emission = np.zeros((q, a))
        self.next_state = np.zeros((q, a), dtype=np.int64)
        weights = dirichlet_rows(rng, options.concentration, q, options.branching)
        for state in range(q):
            allowed = rng.choice(a, size=options.branching, replace=False)
            self.emission[state, allowed] = weights[state]
            self.next_state[state, allowed] = rng.integers(0, q, size=options.branching)
            self.next_state[state, allowed[0]] = (state + 1) % q
        chain = np.zeros((q, q))
        for state in range(q):
            np.add.at(chain[state], self.next_state[state], self.emission[state])
        self.pi = stationary(chain)

    def generate(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """A stationary run: the first state from pi, then character and move, in turn."""
        state = int(rng.choice(len(self.pi), p=self.pi))
        cumulative = [row.tolist() for row in np.cumsum(self.emission, axis=1)]
        moves = self.next_state.tolist()
        # a draw past the row's end (rounding) takes the state's last allowed character
        last = [int(np.flatnonzero(row)[-1]) for row in self.emission]
        out = []
        for u in rng.random(size).tolist():  # sequential: the state depends on the last move
            row = cumulative[state]
            c = min(bisect.bisect_right(row, u * row[-1]), last[state])
            out.append(c)
            state = moves[state][c]
        return np.asarray(out, dtype=np.int64)

    def predictive(self, prefix: np.ndarray) -> np.ndarray:
        """The belief over states, moved by each character seen (exact filtering)."""
        n, length = prefix.shape
        q = len(self.pi)
        probs = np.empty((n, length, len(self.alphabet)))
        belief = np.broadcast_to(self.pi, (n, q)).copy()
        rows = np.repeat(np.arange(n), q)
        for j in range(length):
            c = prefix[:, j]
            weight = belief * self.emission[:, c].T
            weight /= weight.sum(axis=1, keepdims=True)
            belief = np.zeros((n, q))
            np.add.at(belief, (rows, self.next_state[:, c].T.reshape(-1)), weight.reshape(-1))
            probs[:, j] = belief @ self.emission
        return probs

    def entropy_rate(self) -> tuple[float, bool]:
        """sum over states of pi(q) H(emission row q): exact for a unifilar source."""
        return float(self.pi @ row_entropy(self.emission)), True
