"""Synthetic corpora with a known floor: ``markov``, ``hmm``, ``induction``, ``regular``.

Each is a seeded source of printable-ASCII text whose probabilities are known, so the
corpus can compute the best loss any model can reach on its validation windows (its
``floor``; see docs/floors.md). The sources live one per module; this plugin registers them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import slmkit
from slmkit_builtin.hmm import HmmOptions, HmmSource
from slmkit_builtin.induction import InductionOptions, InductionSource
from slmkit_builtin.markov import MarkovOptions, MarkovSource
from slmkit_builtin.regular import RegularOptions, RegularSource
from slmkit_builtin.synthetic_core import Source, SyntheticCorpus


def corpus_factory(name: str, source: Callable[[Any], Source]) -> Callable[[Any], SyntheticCorpus]:
    """The factory of one synthetic corpus: its source built from the options."""

    def factory(options: Any) -> SyntheticCorpus:
        return SyntheticCorpus(name, source(options), options.size, options.seed, options)

    return factory


@slmkit.hookimpl
def register_corpora(register: slmkit.Register) -> None:
    """Provide the ``markov``, ``hmm``, ``induction`` and ``regular`` corpora."""
    register("markov", corpus_factory("markov", MarkovSource), options=MarkovOptions)
    register("hmm", corpus_factory("hmm", HmmSource), options=HmmOptions)
    register("induction", corpus_factory("induction", InductionSource), options=InductionOptions)
    register("regular", corpus_factory("regular", RegularSource), options=RegularOptions)
