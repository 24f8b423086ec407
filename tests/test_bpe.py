"""The ``bpe`` tokenizer (slmkit_builtin.bpe): exact merges, round trips, reference agreement."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, merge
from hypothesis import given, settings
from hypothesis import strategies as st
from slmkit_builtin.bpe import BPETokenizer, learn_merges

import slmkit.plugins
from slmkit import checkpoint
from slmkit.build import build_tokenizer, read_experiment_corpus
from slmkit.config.resolve import experiment_from_dict
from slmkit.errors import ConfigError
from slmkit.plugins import PluginManager
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.train import Trainer

#: the built-ins plus bpe (dict.fromkeys: still right once bpe is among the built-ins)
PLUGINS = tuple(dict.fromkeys((*slmkit.plugins.DEFAULT_PLUGINS, "slmkit_builtin.bpe")))
WORDS = "The quick brown fox jumps over the lazy dog aaaa abab -- héllo wörld, naïve café; 1234\n"
#: random words, so that 144 merges are learned before pairs stop repeating
TRAINING_TEXT = " ".join(random.Random(0).choices(WORDS.split(" "), k=2000))
#: few characters, so that random texts have many repeated pairs and runs
SMALL_ALPHABET = st.text(alphabet="ab \né", max_size=120)


@pytest.fixture(scope="module")
def trained() -> BPETokenizer:
    tokenizer = BPETokenizer(400)
    tokenizer.train(TRAINING_TEXT)
    return tokenizer


# -- slow references: plain Python, straight from the definitions --------------------------


def ref_merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def ref_train(text: str, n_merges: int) -> list[tuple[int, int]]:
    """Recount every pair after every merge; most frequent wins, ties to the smallest pair."""
    ids, merges = list(text.encode("utf-8", "surrogatepass")), []
    while len(merges) < n_merges:
        stats = Counter(itertools.pairwise(ids))
        if not stats:
            break
        pair, count = min(stats.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merges.append(pair)
        ids = ref_merge(ids, pair, 255 + len(merges))
    return merges


def ref_encode(text: str, merges: list[tuple[int, int]]) -> list[int]:
    """Greedy BPE: merge the lowest-rank pair present, until none is a merge."""
    rank = {pair: i for i, pair in enumerate(merges)}
    ids = list(text.encode("utf-8", "surrogatepass"))
    while len(ids) >= 2:
        pair = min(itertools.pairwise(ids), key=lambda p: rank.get(p, math.inf))
        if pair not in rank:
            break
        ids = ref_merge(ids, pair, 256 + rank[pair])
    return ids


# -- exact merges ---------------------------------------------------------------------------


def test_the_wikipedia_example_gives_its_merges_and_stops() -> None:
    tokenizer = BPETokenizer(300)
    tokenizer.train("aaabdaaabac")
    a, b, c, d = (ord(ch) for ch in "abcd")
    # (a, a) occurs 4 times; then (aa, a) and (a, b) tie with 2 each: the smaller pair
    # (a, b) wins, as in the article; then (aa, ab) twice; then no pair repeats
    assert tokenizer.merges == [(a, a), (a, b), (256, 257)]
    assert tokenizer.encode("aaabdaaabac") == [258, d, 258, a, c]
    assert tokenizer.vocab_size == 300  # the configured size; unused ids stay unused
    assert tokenizer.decode([299]) == "\ufffd"


def test_ties_go_to_the_smallest_pair() -> None:
    tokenizer = BPETokenizer(257)
    tokenizer.train("ba" + "ab" + "cd")  # every pair once... so nothing is learned
    assert tokenizer.merges == []
    tokenizer.train("xyxy abab")  # (x, y) and (a, b) twice each, (b, a)/(y, x) once
    assert tokenizer.merges == [(ord("a"), ord("b"))]


def test_overlapping_runs_merge_left_to_right() -> None:
    tokenizer = BPETokenizer(257)
    tokenizer.train("aaaa")
    assert tokenizer.merges == [(97, 97)]
    assert tokenizer.encode("aaaa") == [256, 256]
    assert tokenizer.encode("aaa") == [256, 97]
    assert tokenizer.encode("aaaaa") == [256, 256, 97]
    assert tokenizer.encode("baaab") == [98, 256, 97, 98]


def test_untrained_tokenizer_is_bytes() -> None:
    tokenizer = BPETokenizer()
    assert tokenizer.encode("hé") == [104, 0xC3, 0xA9]
    assert tokenizer.pad_id is None and tokenizer.vocab_size == 512


# -- round trips ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_of_any_text(trained: BPETokenizer, text: str) -> None:
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert all(0 <= i < trained.vocab_size for i in ids)
    assert ids == trained.encode_to_tensor(text).tolist()


def test_round_trip_of_unseen_and_surrogate_characters(trained: BPETokenizer) -> None:
    for text in ("日本語 🎉 \x00\x7f", "lone \ud800 and \udfff", "\ud83d\ude00 pair", "", "x"):
        assert trained.decode(trained.encode(text)) == text, repr(text)


def test_invalid_utf8_decodes_with_replacement_characters(trained: BPETokenizer) -> None:
    assert trained.decode([0xFF, ord("A"), 0xE2, 0x82, ord("B")]) == "\ufffdA\ufffdB"
    assert trained.decode([0xED, 0xA0, 0x80]) == "\ud800"  # an encoded surrogate
    assert trained.decode(torch.tensor([104, 105])) == "hi"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trained.decode([400])


# -- agreement with the slow references --------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(SMALL_ALPHABET, st.text(max_size=80)), n_merges=st.integers(1, 40))
def test_training_agrees_with_the_reference(text: str, n_merges: int) -> None:
    assert learn_merges(text.encode("utf-8"), n_merges, 256 + n_merges) == ref_train(text, n_merges)


@settings(max_examples=150, deadline=None)
@given(training=SMALL_ALPHABET, text=st.one_of(SMALL_ALPHABET, st.text(max_size=80)))
def test_encoding_agrees_with_the_reference(training: str, text: str) -> None:
    tokenizer = BPETokenizer(290)
    tokenizer.train(training)
    assert tokenizer.encode(text) == ref_encode(text, tokenizer.merges)


def test_encoding_agrees_with_the_reference_on_real_text(trained: BPETokenizer) -> None:
    text = TRAINING_TEXT[:500] + "unseen: zebra quartz ✓"
    assert trained.encode(text) == ref_encode(text, trained.merges)
    assert len(trained.merges) == 400 - 256


# -- state -----------------------------------------------------------------------------------


def test_state_dict_survives_json(trained: BPETokenizer) -> None:
    state = json.loads(json.dumps(trained.state_dict()))
    assert state["vocab_size"] == 400 and len(state["merges"]) == 144
    restored = BPETokenizer(257)
    restored.load_state_dict(state)
    assert restored.vocab_size == 400 and restored.merges == trained.merges
    sample = TRAINING_TEXT[:300] + " ñ 🎉"
    assert restored.encode(sample) == trained.encode(sample)


@pytest.mark.parametrize(
    "state",
    [
        [],
        {"merges": []},
        {"vocab_size": 256, "merges": []},
        {"vocab_size": True, "merges": []},
        {"vocab_size": 258, "merges": [[97, 97], [97, 98], [256, 257]]},  # too many
        {"vocab_size": 300, "merges": [[97, 256]]},  # refers to itself
        {"vocab_size": 300, "merges": [[97]]},
        {"vocab_size": 300, "merges": [[97, -1]]},
        {"vocab_size": 300, "merges": [["a", "b"]]},
        {"vocab_size": 300, "merges": "aa"},
    ],
)
def test_malformed_state_is_refused(state: Any) -> None:
    with pytest.raises(ValueError, match="bpe tokenizer state"):
        BPETokenizer().load_state_dict(state)


# -- through the kernel ------------------------------------------------------------------------


@pytest.fixture
def bpe_manager() -> PluginManager:
    return PluginManager(default_plugins=PLUGINS, entry_points=False).load()


def test_vocab_size_is_validated(bpe_manager: PluginManager) -> None:
    data = {"tokenizer": {"name": "bpe", "vocab_size": 100}}
    with pytest.raises(ConfigError, match=r"x.toml: tokenizer.vocab_size: must be >= 257") as e:
        experiment_from_dict(data, bpe_manager, "x.toml")
    assert e.value.key == "tokenizer.vocab_size"
    exp = experiment_from_dict({"tokenizer": {"name": "bpe"}}, bpe_manager, "x.toml")
    assert build_tokenizer(exp).vocab_size == 512


def test_a_run_with_bpe_trains_and_reloads(bpe_manager: PluginManager, tmp_path: Path) -> None:
    data = merge(TINY, {"tokenizer": {"name": "bpe", "vocab_size": 300}})
    exp = experiment_from_dict(data, bpe_manager, "tiny.toml")
    trainer = Trainer(exp, bpe_manager, "tiny.toml", runs_dir=tmp_path / "runs",
                      console=Console(quiet=True))  # fmt: skip
    run_dir = Path(trainer.run()["run_dir"])

    events = read_events(run_dir / "log.jsonl")
    assert [e["event"] for e in events].count("train_step") == 6
    start = events[0]
    tokens = start["train_tokens"] + start["val_tokens"]
    assert tokens < start["corpus"]["chars"]  # merges compress the text
    # bits per character of the raw corpus: loss / ln 2 x tokens per character
    evals = [e for e in events if e["event"] == "eval"]
    expected_bpc = evals[0]["val_loss"] / math.log(2) * tokens / start["corpus"]["chars"]
    assert evals[0]["val_bpc"] == pytest.approx(expected_bpc, rel=1e-12)

    saved = checkpoint.load(run_dir)["tokenizer"]
    assert saved["name"] == "bpe" and len(saved["state"]["merges"]) == 300 - 256
    assert json.loads((run_dir / "tokenizer.json").read_text()) == saved
    reloaded = build_tokenizer(exp)
    reloaded.load_state_dict(saved["state"])
    assert reloaded.merges == trainer.tokenizer.merges
    sample = "def f(x):\n    return x + 1  # ünïcode"
    assert reloaded.encode(sample) == trainer.tokenizer.encode(sample)
    assert torch.equal(
        torch.cat([trainer.data.splits.train, trainer.data.splits.val]).long(),
        torch.cat([reloaded.encode_to_tensor(t) for t in _split_texts(exp, bpe_manager)]).long(),
    )


def _split_texts(exp: Any, manager: PluginManager) -> list[str]:
    """The training and validation texts, split as slmkit.data.prepare_splits does."""
    text = read_experiment_corpus(exp)
    cut = int(len(text) * (1 - exp.data.val_fraction))
    return [text[:cut], text[cut:]]
