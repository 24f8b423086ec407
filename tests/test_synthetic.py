"""Synthetic sources: their floors against brute force, and a model of the true probabilities.

Brute force enumerates what each source hides (the history before the window, the hidden
states, the phase and the unseen characters a repeat copies) and computes P(window prefix)
from the source's definition; the predictor must give P(next | prefix) = P(prefix + next) /
P(prefix) for every position of every window.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from slmkit_builtin.char import CharTokenizer
from slmkit_builtin.hmm import HmmOptions, HmmSource
from slmkit_builtin.induction import InductionOptions, InductionSource
from slmkit_builtin.markov import MarkovOptions, MarkovSource
from slmkit_builtin.regular import RegularOptions, RegularSource
from slmkit_builtin.synthetic import corpus_factory
from slmkit_builtin.synthetic_core import Source, floor_of

from slmkit.data import validation_batches
from slmkit.evaluate import evaluate
from slmkit.options import OptionValueError

seeds = st.integers(0, 2**16)
concentrations = st.sampled_from([0.1, 0.5, 2.0])


def check_against(source: Source, joint: object, length: int, seed: int) -> None:
    """``source.predictive`` on random windows equals ratios of the brute-force joint."""
    codes = source.generate(4 * (length + 1), np.random.default_rng(seed))
    windows = codes.reshape(4, length + 1)
    probs = source.predictive(windows[:, :-1])
    a = len(source.alphabet)
    for w, window in enumerate(windows):
        for j in range(length):
            seen = tuple(window[: j + 1])
            before = joint(seen)  # type: ignore[operator]
            expected = [joint((*seen, c)) / before for c in range(a)]  # type: ignore[operator]
            assert probs[w, j] == pytest.approx(expected, abs=1e-12, rel=1e-9)
    picked = np.take_along_axis(probs, windows[:, 1:, None], axis=2)
    assert floor_of(source, codes, length, 4) == pytest.approx(-np.log(picked).mean(), abs=1e-15)


@settings(max_examples=25, deadline=None)
@given(alphabet=st.integers(2, 3), order=st.integers(1, 2), c=concentrations, seed=seeds)
def test_markov_predictor_marginalises_the_unseen_history(
    alphabet: int, order: int, c: float, seed: int
) -> None:
    source = MarkovSource(MarkovOptions(alphabet=alphabet, order=order, concentration=c, seed=seed))
    histories = list(itertools.product(range(alphabet), repeat=order))

    def joint(chars: tuple[int, ...]) -> float:  # sum over the k characters before the window
        def code(history: list[int]) -> int:
            return sum(x * alphabet ** (order - 1 - i) for i, x in enumerate(history))

        total = 0.0
        for h in histories:
            p, last = source.pi[code(list(h))], list(h)
            for x in chars:
                p *= source.rows[code(last), x]
                last = [*last[1:], x]
            total += p
        return total

    check_against(source, joint, 5, seed)


@settings(max_examples=25, deadline=None)
@given(
    alphabet=st.integers(2, 3),
    states=st.integers(1, 3),
    stay=st.sampled_from([0.0, 0.5, 0.9]),
    c=concentrations,
    seed=seeds,
)
def test_hmm_forward_algorithm_equals_enumerating_hidden_paths(
    alphabet: int, states: int, stay: float, c: float, seed: int
) -> None:
    source = HmmSource(
        HmmOptions(alphabet=alphabet, states=states, stay=stay, concentration=c, seed=seed)
    )

    def joint(chars: tuple[int, ...]) -> float:
        total = 0.0
        for path in itertools.product(range(states), repeat=len(chars)):
            p = source.pi[path[0]] * source.emission[path[0], chars[0]]
            for t in range(1, len(chars)):
                p *= source.transition[path[t - 1], path[t]] * source.emission[path[t], chars[t]]
            total += p
        return total

    check_against(source, joint, 5, seed)


@settings(max_examples=25, deadline=None)
@given(alphabet=st.integers(2, 4), states=st.integers(1, 4), c=concentrations, seed=seeds)
def test_regular_filtering_equals_enumerating_start_states(
    alphabet: int, states: int, c: float, seed: int
) -> None:
    options = RegularOptions(
        alphabet=alphabet, states=states, branching=min(2, alphabet), concentration=c, seed=seed
    )
    source = RegularSource(options)

    def joint(chars: tuple[int, ...]) -> float:
        total = 0.0
        for start in range(states):
            p, q = source.pi[start], start
            for x in chars:
                p *= source.emission[q, x]
                q = source.next_state[q, x]
            total += p
        return total

    check_against(source, joint, 5, seed)


@settings(max_examples=15, deadline=None)
@given(segment=st.integers(1, 2), filler_min=st.integers(0, 1), seed=seeds)
def test_induction_forward_equals_enumerating_phases_and_unseen_characters(
    segment: int, filler_min: int, seed: int
) -> None:
    options = InductionOptions(
        alphabet=2, segment=segment, filler_min=filler_min, filler_max=filler_min + 1, seed=seed
    )
    source = InductionSource(options)
    phases = list(source.index)
    before = segment + filler_min + 1  # the longest lag: unseen characters enumerated

    def lag(phase: tuple[str, int, int]) -> int | None:
        return segment + phase[1] if phase[0] == "copy" else None

    def paths(n: int) -> list[tuple[float, list[int]]]:
        found = [(source.pi[s], [s]) for s in range(len(phases)) if source.pi[s] > 0]
        for _ in range(n - 1):
            found = [
                (p * source.transition[path[-1], t], [*path, t])
                for p, path in found
                for t in np.flatnonzero(source.transition[path[-1]])
            ]
        return found

    def joint(chars: tuple[int, ...]) -> float:
        total = 0.0
        for p, path in paths(before + len(chars)):
            for unseen in itertools.product(range(2), repeat=before):
                text = [*unseen, *chars]
                q = p
                for t, s in enumerate(path):
                    back = lag(phases[s])
                    if back is not None and t - back >= 0:  # a repeat of a known character
                        q *= float(text[t] == text[t - back])
                    else:  # a fresh character, or a repeat of one before the enumeration
                        q *= 0.5
                total += q
        return total

    check_against(source, joint, 4, seed)


class TruePredictor(torch.nn.Module):
    """A source's own predictor with the LanguageModel call signature (char-tokenizer ids)."""

    def __init__(self, source: Source, tokenizer: CharTokenizer) -> None:
        super().__init__()
        self.source = source
        ids = tokenizer.encode(source.alphabet)
        self.code_of = torch.full((tokenizer.vocab_size,), -1, dtype=torch.long)
        self.code_of[torch.tensor(ids)] = torch.arange(len(ids))
        self.ids = torch.tensor(ids)
        self.vocab_size = tokenizer.vocab_size

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        probs = torch.from_numpy(self.source.predictive(self.code_of[x].numpy()))
        logits = torch.full((*x.shape, self.vocab_size), -math.inf, dtype=torch.float64)
        logits[..., self.ids] = probs.log()
        loss = None
        if y is not None:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        return logits, loss


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("markov", MarkovSource(MarkovOptions(alphabet=5, order=2, seed=3))),
        ("hmm", HmmSource(HmmOptions(alphabet=6, states=3, seed=3))),
        ("induction", InductionSource(InductionOptions(alphabet=6, segment=3, seed=3))),
        ("regular", RegularSource(RegularOptions(alphabet=6, seed=3))),
    ],
)
def test_the_true_probabilities_score_exactly_the_floor(name: str, source: Source) -> None:
    options = {"markov": MarkovOptions, "hmm": HmmOptions}.get(name)
    corpus = corpus_factory(name, lambda _options: source)(
        (options or InductionOptions)(size=20_000, seed=3)
        if name != "regular"
        else RegularOptions(size=20_000, seed=3)
    )
    text = corpus.text()
    val_text = text[18_000:]
    tokenizer = CharTokenizer()
    batches = validation_batches(torch.tensor(tokenizer.encode(val_text)), 24, 5, 3)
    model = TruePredictor(source, tokenizer)
    scored = evaluate(model, batches, torch.device("cpu"))  # type: ignore[arg-type]
    floor = corpus.floor(val_text, 24, 5 * 3)
    assert floor.targets == 5 * 3 * 24
    assert scored == pytest.approx(floor.val_loss, abs=1e-12)
    assert floor.entropy_rate > 0


@pytest.mark.parametrize(
    ("options", "call", "key", "message"),
    [
        (MarkovOptions, {"alphabet": 96}, "alphabet", "must be an integer in [2, 95]"),
        (MarkovOptions, {"order": 0}, "order", "must be > 0, got 0"),
        (MarkovOptions, {"alphabet": 20, "order": 3}, "order", "20**3 histories"),
        (MarkovOptions, {"size": 0}, "size", "must be > 0"),
        (HmmOptions, {"states": 0}, "states", "must be in [1, 256], got 0"),
        (HmmOptions, {"stay": 1.0}, "stay", "must be in [0, 1), got 1.0"),
        (InductionOptions, {"filler_max": 4}, "filler_max", "must be more than filler_min = 4"),
        (InductionOptions, {"segment": 0}, "segment", "must be > 0"),
        (RegularOptions, {"branching": 9}, "branching", "at most alphabet = 8"),
    ],
)
def test_options_that_make_no_source_are_refused_naming_the_key(
    options: type, call: dict[str, object], key: str, message: str
) -> None:
    with pytest.raises(OptionValueError) as caught:
        options(**call)
    assert caught.value.key == key
    assert message in caught.value.message


def test_text_is_seeded_printable_ascii_of_the_asked_size() -> None:
    make = corpus_factory("markov", MarkovSource)
    first = make(MarkovOptions(size=5000, alphabet=10, seed=1)).text()
    assert first == make(MarkovOptions(size=5000, alphabet=10, seed=1)).text()
    assert first != make(MarkovOptions(size=5000, alphabet=10, seed=2)).text()
    assert len(first) == 5000 and set(first) == set("abcdefghij")
