"""The ``induction`` source: a random segment, filler, the same segment again.

The text is a run of episodes. Each is ``segment`` uniformly random characters, a filler
of uniformly random characters whose length is drawn uniformly from ``filler_min`` to
``filler_max``, and the segment once more. Only the repeat is predictable, and only by
looking back ``segment + filler`` characters: the task on which induction heads form.

The phase (where in an episode a character falls, and the filler length of its episode)
is a hidden Markov chain, and the text starts from its stationary distribution. The floor
is the forward algorithm over that phase: a repeated character must equal the character
one lag back when the window shows it, and is uniform when the window starts after it.
Filler lengths take at least two values, so the episodes do not keep a fixed period that
a model could learn from the window positions instead of the text.
"""

from __future__ import annotations

import attrs
import numpy as np

import slmkit
from slmkit_builtin.synthetic_core import ALPHABET as CHARS
from slmkit_builtin.synthetic_core import alphabet_size, estimated_rate, stationary, whole

MAX_PHASES = 1024


@attrs.define(frozen=True)
class InductionOptions:
    """Options of the ``induction`` corpus (keys of the ``[data]`` table)."""

    #: characters generated
    size: int = attrs.field(default=1_000_000, validator=[whole, slmkit.positive])
    #: characters used: the first ``alphabet`` of a-z, A-Z, 0-9, punctuation, space (<= 95)
    alphabet: int = attrs.field(default=16, validator=alphabet_size)
    #: length of the segment that repeats
    segment: int = attrs.field(default=8, validator=[whole, slmkit.positive])
    #: shortest filler between a segment and its repeat
    filler_min: int = attrs.field(default=4, validator=[whole, slmkit.non_negative])
    #: longest filler (more than filler_min)
    filler_max: int = attrs.field(default=12, validator=[whole, slmkit.non_negative])
    #: seed of the text
    seed: int = attrs.field(default=0, validator=[whole, slmkit.non_negative])

    def __attrs_post_init__(self) -> None:
        if self.filler_max <= self.filler_min:
            raise slmkit.OptionValueError(
                "filler_max",
                f"must be more than filler_min = {self.filler_min}, got {self.filler_max} "
                "(a fixed episode length would make the phase periodic)",
            )
        fillers = range(self.filler_min, self.filler_max + 1)
        phases = self.segment * (1 + len(fillers)) + sum(fillers)
        if phases > MAX_PHASES:
            raise slmkit.OptionValueError(
                "filler_max",
                f"segment and fillers make {phases} phases, more than {MAX_PHASES}; "
                "use a shorter segment or fewer filler lengths",
            )


class InductionSource:
    """Phases: ``segment`` first-copy ones, ``(f, r)`` filler ones, ``(f, i)`` repeat ones."""

    def __init__(self, options: InductionOptions) -> None:
        self.alphabet = CHARS[: options.alphabet]
        self.seed = options.seed
        m = self.segment = options.segment
        self.fillers = list(range(options.filler_min, options.filler_max + 1))
        index: dict[tuple[str, int, int], int] = {}
        for i in range(m):
            index["seg", 0, i] = len(index)
        for f in self.fillers:
            for r in range(f):
                index["fill", f, r] = len(index)
        for f in self.fillers:
            for i in range(m):
                index["copy", f, i] = len(index)
        self.index = index
        e = len(index)
        self.transition = np.zeros((e, e))
        chance = 1 / len(self.fillers)
        for (part, f, i), s in index.items():
            if part == "seg" and i < m - 1:
                self.transition[s, index["seg", 0, i + 1]] = 1
            elif part == "seg":  # the segment ends: a filler length is drawn
                for g in self.fillers:
                    after = index["fill", g, 0] if g else index["copy", 0, 0]
                    self.transition[s, after] += chance
            elif part == "fill":
                after = index["fill", f, i + 1] if i < f - 1 else index["copy", f, 0]
                self.transition[s, after] = 1
            else:
                after = index["copy", f, i + 1] if i < m - 1 else index["seg", 0, 0]
                self.transition[s, after] = 1
        self.pi = stationary(self.transition)
        #: per filler length, the repeat phases (columns) that copy from m + f back
        self.copy_columns = [
            np.array([index["copy", f, i] for i in range(m)]) for f in self.fillers
        ]

    def generate(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """Episodes from a stationary phase: the first one entered part way through."""
        m, a = self.segment, len(self.alphabet)
        keys = list(self.index)
        part, f, i = keys[int(rng.choice(len(keys), p=self.pi))]
        if part == "seg":
            f, offset = int(rng.choice(self.fillers)), i
        else:
            offset = m + i if part == "fill" else m + f + i
        # Every character is uniform but the repeats: draw them all, then copy segments.
        count = (size + offset) // (2 * m + self.fillers[0]) + 2
        fillers = rng.choice(self.fillers, size=count)
        fillers[0] = f
        starts = np.concatenate([[0], np.cumsum(2 * m + fillers)[:-1]])
        text = rng.integers(0, a, size=int(starts[-1] + 2 * m + fillers[-1]))
        within = np.arange(m)
        text[(starts + m + fillers)[:, None] + within] = text[starts[:, None] + within]
        return text[offset : offset + size].astype(np.int64)

    def predictive(self, prefix: np.ndarray) -> np.ndarray:
        """The forward algorithm over phases; a repeat's source is known once in the window."""
        n, length = prefix.shape
        a, m = len(self.alphabet), self.segment
        lags = [m + f for f in self.fillers]
        probs = np.empty((n, length, a))
        rows = np.arange(n)
        belief = np.broadcast_to(self.pi, (n, len(self.pi))).copy()  # phase of prefix[:, j]
        for j in range(length):
            likelihood = np.full((n, len(self.pi)), 1 / a)
            for lag, columns in zip(lags, self.copy_columns, strict=True):
                if j >= lag:
                    same = prefix[:, j] == prefix[:, j - lag]
                    likelihood[:, columns] = same[:, None]
            belief *= likelihood
            belief /= belief.sum(axis=1, keepdims=True)
            belief = belief @ self.transition  # phase of the next character
            step = np.zeros((n, a))
            free = belief.sum(axis=1)
            for lag, columns in zip(lags, self.copy_columns, strict=True):
                if j + 1 >= lag:  # the repeated character is in the window
                    mass = belief[:, columns].sum(axis=1)
                    step[rows, prefix[:, j + 1 - lag]] += mass
                    free -= mass
            probs[:, j] = step + (free / a)[:, None]
        return probs

    def entropy_rate(self) -> tuple[float, bool]:
        """No simple closed form (the phase is hidden): estimated with long context."""
        return estimated_rate(self, self.seed), False
