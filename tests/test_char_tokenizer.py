"""The ``char`` tokenizer: its fixed vocabulary policy, normalization and encoding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from slmkit_builtin.char import _CHUNK, PAD_ID, UNK_ID, CharTokenizer, normalize

POLICY_ALPHABET = "\t\n" + "".join(chr(c) for c in range(32, 127))
policy_text = st.text(alphabet=st.sampled_from(POLICY_ALPHABET), max_size=200)
any_text = st.text(max_size=200)

tok = CharTokenizer()


# tiny ops: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the vocabulary policy ---------------------------------------------------------------


def test_vocabulary_is_exactly_the_policy() -> None:
    expected = ["<PAD>", "<UNK>", "\t", "\n", *(chr(c) for c in range(32, 127))]
    assert tok.tokens == expected
    assert tok.vocab_size == 99 == len(expected)
    assert (PAD_ID, UNK_ID) == (0, 1)
    assert tok.pad_id == 0
    assert tok.encode("\t\n ~") == [2, 3, 4, 98]
    assert tok.encode("A") == [4 + ord("A") - 32]


def test_vocabulary_is_the_same_for_every_instance_and_train_is_a_no_op() -> None:
    other = CharTokenizer()
    other.train("zzzz 中文 text that should change nothing")
    assert other.tokens == tok.tokens
    assert other.encode("hello") == tok.encode("hello")


# --- round trips and ranges (properties) -------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(policy_text)
def test_decode_encode_round_trips_policy_text(text: str) -> None:
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(any_text)
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once


def test_normalize_is_idempotent_over_every_code_point() -> None:
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    once = normalize(every)
    assert normalize(once) == once
    ids = tok.encode_to_tensor(every)
    assert len(ids) == len(once)
    assert int(ids.min()) >= 1 and int(ids.max()) < tok.vocab_size


@settings(max_examples=200, deadline=None)
@given(any_text)
def test_every_id_is_in_the_vocabulary(text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert PAD_ID not in ids  # padding never comes out of text


@settings(max_examples=200, deadline=None)
@given(any_text)
def test_encode_and_encode_to_tensor_agree(text: str) -> None:
    tensor = tok.encode_to_tensor(text)
    assert tensor.dtype == torch.uint8
    assert tensor.dim() == 1
    assert tensor.tolist() == tok.encode(text)


@settings(max_examples=100, deadline=None)
@given(any_text)
def test_decode_of_encode_is_normalized_text_with_unk_marks(text: str) -> None:
    normalized = normalize(text)
    expected = "".join(c if c in POLICY_ALPHABET else "\ufffd" for c in normalized)
    assert tok.decode(tok.encode(text)) == expected


def test_decode_accepts_a_tensor() -> None:
    ids = tok.encode_to_tensor("tensor in")
    assert tok.decode(ids) == "tensor in"


# --- normalization -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a\r\nb", "a\nb"),
        ("a\rb", "a\nb"),
        ("a\r\r\nb\n", "a\n\nb\n"),
        ("\r\n\r\n", "\n\n"),
        ("é", "e"),
        ("Ñandú", "Nandu"),
        ("café crème", "cafe creme"),
        ("\u2018single\u2019 \u201cdouble\u201d", "'single' \"double\""),
        ("a\u2013b\u2014c", "a-b-c"),
        ("wait\u2026", "wait..."),
        ("non\u00a0breaking", "non breaking"),
        ("Straße", "Strasse"),
        ("plain ascii\tstays\n", "plain ascii\tstays\n"),
    ],
)
def test_normalize_examples(raw: str, expected: str) -> None:
    assert normalize(raw) == expected
    assert tok.decode(tok.encode(raw)) == expected


def test_crlf_encodes_as_one_newline() -> None:
    assert tok.encode("\r\n") == [3]
    assert tok.encode("\r") == [3]
    assert tok.encode("x\r\ny") == tok.encode("x\ny")


def test_char_without_ascii_spelling_is_unk() -> None:
    assert normalize("中") == "中"  # left alone, not dropped
    assert tok.encode("中") == [UNK_ID]
    assert tok.decode([UNK_ID]) == "\ufffd"
    assert tok.decode(tok.encode("a中b")) == "a\ufffdb"


def test_pad_decodes_to_nothing() -> None:
    assert tok.decode([PAD_ID]) == ""
    assert tok.decode([PAD_ID, *tok.encode("hi"), PAD_ID, PAD_ID]) == "hi"


def test_empty_text() -> None:
    assert tok.encode("") == []
    assert tok.encode_to_tensor("").shape == (0,)
    assert tok.decode([]) == ""


def test_lone_surrogate_encodes_to_unk() -> None:
    assert tok.encode("a\udcff") == [tok.encode("a")[0], UNK_ID]


# --- state -------------------------------------------------------------------------------


def test_state_dict_round_trip() -> None:
    state = tok.state_dict()
    assert state["tokens"] == tok.tokens
    fresh = CharTokenizer()
    fresh.load_state_dict(state)  # accepted
    assert fresh.tokens == tok.tokens
    assert fresh.encode("round trip") == tok.encode("round trip")


def test_state_dict_is_plain_json() -> None:
    import json

    state = tok.state_dict()
    assert json.loads(json.dumps(state)) == state


@pytest.mark.parametrize(
    "tokens",
    [
        ["<PAD>", "<UNK>", "a", "b"],
        [*CharTokenizer().tokens, "extra"],
        list(reversed(CharTokenizer().tokens)),
    ],
)
def test_load_state_dict_rejects_another_vocabulary(tokens: list[str]) -> None:
    fresh = CharTokenizer()
    with pytest.raises(ValueError, match="char policy's vocabulary"):
        fresh.load_state_dict({"policy": "whatever", "tokens": tokens})


def test_load_state_dict_rejects_missing_tokens() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        CharTokenizer().load_state_dict({})


# --- chunked encoding of large texts -----------------------------------------------------


def test_large_text_encodes_like_its_pieces() -> None:
    # A non-ASCII first part longer than one chunk (so a chunk boundary falls inside it
    # and the vectorized non-ASCII path runs on both sides), then an ASCII tail.
    piece = "aé中\t€—"  # normalizes to 6 chars: "a", "e", "中", "\t", "€", "-"
    reps = _CHUNK // len(normalize(piece)) + 1000
    tail = "the ascii tail.\n" * 50
    big = piece * reps + tail
    assert len(big) > _CHUNK
    assert len(normalize(big)) > _CHUNK

    got = tok.encode_to_tensor(big)
    piece_ids = tok.encode_to_tensor(piece)
    expected = torch.cat([piece_ids.repeat(reps), tok.encode_to_tensor(tail)])
    assert got.dtype == torch.uint8
    assert torch.equal(got, expected)
    assert piece_ids.tolist() == [
        tok.encode("a")[0],
        tok.encode("e")[0],
        UNK_ID,
        2,
        UNK_ID,
        tok.encode("-")[0],
    ]


# --- encoding a span in place (the data pipeline's path) ----------------------------------


def reference_ids(text: str) -> list[int]:
    """One id per normalized character, looked up one by one: the policy, spelled out."""
    id_of = {ch: i for i, ch in enumerate(tok.tokens) if i >= 2}
    return [id_of.get(ch, UNK_ID) for ch in normalize(text)]


# mostly ASCII, with \r\n pairs, accents, curly quotes, characters that normalization
# lengthens ("ß" -> "ss", "…" -> "...") or drops (soft hyphen), and ones it cannot spell
mixed_text = st.lists(
    st.sampled_from(
        ["a", "b", " ", "\n", "\r", "\r\n", "é", "\u201c", "ß", "…", "\u00ad", "中", "\ud800"]
    ),
    max_size=120,
).map("".join)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 7 characters, so that short texts cross many chunk boundaries."""
    import slmkit_builtin.char

    monkeypatch.setattr(slmkit_builtin.char, "_CHUNK", 7)


@settings(max_examples=300, deadline=None)
@given(mixed_text, st.data())
def test_encode_span_equals_encoding_the_slice(text: str, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, len(text)))
    ids = tok.encode_span(text, start, end)
    assert ids.dtype == torch.uint8
    assert ids.tolist() == reference_ids(text[start:end])


@pytest.mark.usefixtures("small_chunks")
@settings(max_examples=300, deadline=None)
@given(mixed_text)
def test_chunk_boundaries_and_growth_change_nothing(text: str) -> None:
    assert tok.encode_to_tensor(text).tolist() == reference_ids(text)


@pytest.mark.usefixtures("small_chunks")
def test_output_grows_when_normalization_lengthens_the_text() -> None:
    text = "ß" * 50 + "…" * 30 + "x"  # 81 characters -> 100 + 90 + 1
    ids = tok.encode_to_tensor(text)
    assert len(ids) == 191
    assert ids.tolist() == reference_ids(text)


def test_a_crlf_pair_at_a_chunk_boundary_stays_one_newline(small_chunks: None) -> None:
    text = "abcdef\r\nghijkl\r\n"  # the \r is the 7th character: the end of the first chunk
    assert tok.encode_to_tensor(text).tolist() == reference_ids(text)
    assert tok.decode(tok.encode_to_tensor(text)) == "abcdef\nghijkl\n"
    # a chunk that ends in \r followed by another \r is not stretched onto a new pair
    assert tok.encode_to_tensor("aaaa\r\n\r\r\n").tolist() == reference_ids("aaaa\n\n\n")
