"""The ``hmm`` source: a hidden Markov model with sticky states.

``states`` hidden states; each stays put with probability ``stay`` and otherwise moves to
another state drawn from a row of its own (Dirichlet(1) over the others). Each state emits
characters from its own distribution (Dirichlet with ``concentration``). A model has to
infer the hidden state from the context; the floor is the forward algorithm over each
window, started from the stationary distribution (where the text starts too).
"""

from __future__ import annotations

import attrs
import numpy as np

import slmkit
from slmkit_builtin.synthetic_core import ALPHABET as CHARS
from slmkit_builtin.synthetic_core import (
    alphabet_size,
    dirichlet_rows,
    estimated_rate,
    stationary,
    whole,
)

MAX_STATES = 256


@attrs.define(frozen=True)
class HmmOptions:
    """Options of the ``hmm`` corpus (keys of the ``[data]`` table)."""

    #: characters generated
    size: int = attrs.field(default=1_000_000, validator=[whole, slmkit.positive])
    #: characters used: the first ``alphabet`` of a-z, A-Z, 0-9, punctuation, space (<= 95)
    alphabet: int = attrs.field(default=16, validator=alphabet_size)
    #: hidden states (1 to 256)
    states: int = attrs.field(default=4, validator=[whole, slmkit.in_range(1, MAX_STATES)])
    #: probability that the hidden state stays the same from one character to the next
    stay: float = attrs.field(default=0.95, validator=slmkit.in_range(0, 1, high_open=True))
    #: Dirichlet concentration of each state's emission distribution
    concentration: float = attrs.field(default=0.3, validator=slmkit.positive)
    #: seed of the model and of the text
    seed: int = attrs.field(default=0, validator=[whole, slmkit.non_negative])


class HmmSource:
    """A sticky HMM: ``transition`` (S, S), ``emission`` (S, A), stationary start ``pi``."""

    def __init__(self, options: HmmOptions) -> None:
        self.alphabet = CHARS[: options.alphabet]
        self.seed = options.seed
        s = options.states
        rng = np.random.default_rng([options.seed, 0])
        self.emission = dirichlet_rows(rng, options.concentration, s, options.alphabet)
        moves = np.zeros((s, s))
        if s > 1:
            others = dirichlet_rows(rng, 1.0, s, s - 1)
            for i in range(s):
                moves[i, np.arange(s) != i] = others[i]
            self.transition = options.stay * np.eye(s) + (1 - options.stay) * moves
        else:
            self.transition = np.ones((1, 1))
        self.stay = options.stay if s > 1 else 1.0
        self.moves = moves
        self.pi = stationary(self.transition)

    def hidden_path(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """A stationary run of the hidden chain, as runs of geometric length (memoryless)."""
        s = len(self.pi)
        state = int(rng.choice(s, p=self.pi))
        if s == 1:
            return np.zeros(size, dtype=np.int64)
        states, lengths, total = [], [], 0
        cumulative = np.cumsum(self.moves, axis=1)
        while total < size:
            batch = rng.geometric(1 - self.stay, size=1024)
            picks = rng.random(1024)
            for length, u in zip(batch.tolist(), picks.tolist(), strict=True):
                states.append(state)
                lengths.append(length)
                total += length
                if total >= size:
                    break
                row = cumulative[state]
                state = min(int(np.searchsorted(row, u * row[-1], side="right")), s - 1)
        return np.repeat(np.asarray(states), lengths)[:size]

    def generate(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """Hidden states, then each state's characters drawn together."""
        path = self.hidden_path(size, rng)
        uniforms = rng.random(size)
        codes = np.empty(size, dtype=np.int64)
        last = len(self.alphabet) - 1
        for state, row in enumerate(np.cumsum(self.emission, axis=1)):
            at = path == state
            codes[at] = np.minimum(np.searchsorted(row, uniforms[at] * row[-1], side="right"), last)
        return codes

    def predictive(self, prefix: np.ndarray) -> np.ndarray:
        """The forward algorithm over each window, from the stationary distribution."""
        n, length = prefix.shape
        probs = np.empty((n, length, len(self.alphabet)))
        belief = np.broadcast_to(self.pi, (n, len(self.pi)))  # state of the character seen
        for j in range(length):
            seen = belief * self.emission[:, prefix[:, j]].T
            seen /= seen.sum(axis=1, keepdims=True)
            belief = seen @ self.transition  # state of the next character
            probs[:, j] = belief @ self.emission
        return probs

    def entropy_rate(self) -> tuple[float, bool]:
        """No closed form for an HMM: estimated with hundreds of characters of context."""
        return estimated_rate(self, self.seed), False
