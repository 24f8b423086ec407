"""The data pipeline: corpus -> text -> train/validation split -> windows -> batches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from slmkit_builtin.char import CharTokenizer
from slmkit_builtin.corpora import FileCorpus, FileOptions

from slmkit.data import (
    BatchStream,
    compact_dtype,
    count_equal,
    epoch_order,
    prepare_splits,
    read_corpus,
    validation_batches,
    windows,
)
from slmkit.errors import DataError
from slmkit.options import OptionValueError

TEXT = "".join(chr(32 + (i * 7919) % 95) for i in range(1000))  # printable ASCII


# tiny ops: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ListCorpus:
    """A corpus from a list of strings."""

    def __init__(self, texts: list[str]) -> None:
        self._texts = texts

    def describe(self) -> dict[str, object]:
        return {"texts": len(self._texts)}

    def texts(self) -> list[str]:
        return list(self._texts)


def unique_tokens(n_windows: int, context_length: int, extra: int = 0) -> torch.Tensor:
    """Tokens whose windows are told apart by their first token: window i starts at i*w."""
    return torch.arange(n_windows * (context_length + 1) + extra)


def window_index(batch_inputs: torch.Tensor, context_length: int) -> list[int]:
    return (batch_inputs[:, 0] // (context_length + 1)).tolist()


# --- read_corpus -------------------------------------------------------------------------


@pytest.mark.parametrize("texts", [[], [""], ["   \n\t "], ["", "\n", "  "]])
def test_read_corpus_refuses_an_empty_corpus(texts: list[str]) -> None:
    with pytest.raises(DataError, match="empty"):
        read_corpus(ListCorpus(texts))


def test_read_corpus_joins_texts_with_newlines() -> None:
    assert read_corpus(ListCorpus(["only"])) == "only"
    assert read_corpus(ListCorpus(["a", "b", "c"])) == "a\nb\nc"


# --- prepare_splits ----------------------------------------------------------------------


@pytest.mark.parametrize(("val_fraction", "cut"), [(0.1, 900), (0.25, 750), (0.5, 500)])
def test_split_is_train_first_then_validation(val_fraction: float, cut: int) -> None:
    tok = CharTokenizer()
    splits = prepare_splits(TEXT, tok, val_fraction, context_length=16)
    assert torch.equal(splits.train, tok.encode_to_tensor(TEXT[:cut]))
    assert torch.equal(splits.val, tok.encode_to_tensor(TEXT[cut:]))
    assert splits.train.tolist() == tok.encode(TEXT[:cut])
    assert splits.val.tolist() == tok.encode(TEXT[cut:])
    assert len(splits.train) == cut
    assert len(splits.val) == 1000 - cut
    assert splits.n_chars == 1000
    assert splits.chars_per_token == 1.0


def test_split_tensors_are_compact() -> None:
    splits = prepare_splits(TEXT, CharTokenizer(), 0.1, context_length=16)
    assert splits.train.dtype == torch.uint8
    assert splits.val.dtype == torch.uint8
    assert splits.train.dim() == splits.val.dim() == 1


def test_compact_dtype() -> None:
    assert compact_dtype(99) == torch.uint8
    assert compact_dtype(256) == torch.uint8
    assert compact_dtype(257) == torch.int16
    assert compact_dtype(2**15) == torch.int16
    assert compact_dtype(2**15 + 1) == torch.int32


def test_split_records_the_corpus_hash() -> None:
    import hashlib

    splits = prepare_splits(TEXT, CharTokenizer(), 0.1, context_length=16)
    assert splits.corpus_sha256 == hashlib.sha256(TEXT.encode("utf-8")).hexdigest()


def test_tokenizer_is_trained_on_the_training_part_only() -> None:
    class Recording(CharTokenizer):
        needs_training = True
        seen: list[str]

        def train(self, text: str) -> None:
            self.seen = [*getattr(self, "seen", []), text]

    tok = Recording()
    prepare_splits(TEXT, tok, 0.1, context_length=16)
    assert tok.seen == [TEXT[:900]]
    untrained = Recording()
    prepare_splits(TEXT, untrained, 0.1, context_length=16, train_tokenizer=False)
    assert not hasattr(untrained, "seen")


def test_too_small_for_one_validation_window() -> None:
    # 100 chars, val_fraction 0.1 -> 10 validation tokens; one window needs 17
    with pytest.raises(DataError) as info:
        prepare_splits("x" * 100, CharTokenizer(), 0.1, context_length=16)
    message = str(info.value)
    assert "validation" in message
    assert "17" in message
    assert "10 tokens" in message


def test_too_small_for_one_training_window() -> None:
    # 100 chars, val_fraction 0.9 -> 10 training tokens (validation has 90 >= 17)
    with pytest.raises(DataError) as info:
        prepare_splits("x" * 100, CharTokenizer(), 0.9, context_length=16)
    assert "training" in str(info.value)
    assert "17" in str(info.value)


def test_exactly_one_window_is_enough() -> None:
    # 170 chars, val 0.1 -> 17 validation tokens: exactly one window of 16 + 1
    splits = prepare_splits("y" * 170, CharTokenizer(), 0.1, context_length=16)
    assert len(splits.val) == 17
    assert windows(splits.val, 16).shape == (1, 17)


# --- windows -----------------------------------------------------------------------------


def test_windows_shape_and_contents() -> None:
    tokens = torch.arange(53)
    got = windows(tokens, context_length=4)
    assert got.shape == (10, 5)  # 53 // 5; the last 3 tokens are dropped
    assert torch.equal(got, torch.arange(50).view(10, 5))
    assert got[3].tolist() == [15, 16, 17, 18, 19]


def test_windows_of_too_few_tokens_is_empty() -> None:
    assert windows(torch.arange(4), context_length=4).shape == (0, 5)


# --- BatchStream -------------------------------------------------------------------------


def test_batch_inputs_and_targets_are_the_window_shifted_by_one() -> None:
    ctx = 6
    tokens = unique_tokens(20, ctx)
    stream = BatchStream(tokens, context_length=ctx, batch_size=4, seed=0)
    all_windows = windows(tokens, ctx)
    for _ in range(5):
        inputs, targets = stream.next_batch()
        assert inputs.shape == targets.shape == (4, ctx)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row_in, row_t, i in zip(inputs, targets, window_index(inputs, ctx), strict=True):
            assert torch.equal(row_in, all_windows[i, :-1])
            assert torch.equal(row_t, all_windows[i, 1:])


def test_batches_are_int64_from_uint8_tokens() -> None:
    tokens = CharTokenizer().encode_to_tensor(TEXT)
    stream = BatchStream(tokens, context_length=16, batch_size=3, seed=1)
    inputs, targets = stream.next_batch()
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.shape == (3, 16)


@settings(max_examples=60, deadline=None)
@given(
    n_windows=st.integers(min_value=1, max_value=40),
    batch_size=st.integers(min_value=1, max_value=12),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_every_window_once_per_epoch(n_windows: int, batch_size: int, seed: int) -> None:
    ctx = 3
    stream = BatchStream(unique_tokens(n_windows, ctx, extra=2), ctx, batch_size, seed)
    assert stream.n_windows == n_windows
    epochs = 3
    n_batches = math.ceil(epochs * n_windows / batch_size)
    seen: list[int] = []
    for _ in range(n_batches):
        inputs, _ = stream.next_batch()
        seen += window_index(inputs, ctx)
    assert stream.consumed == n_batches * batch_size
    for epoch in range(epochs):
        chunk = seen[epoch * n_windows : (epoch + 1) * n_windows]
        assert sorted(chunk) == list(range(n_windows))
        assert chunk == epoch_order(n_windows, seed, epoch).tolist()


def _epoch_windows(stream: BatchStream, ctx: int) -> list[int]:
    seen: list[int] = []
    while len(seen) < stream.n_windows:
        seen += window_index(stream.next_batch()[0], ctx)
    return seen


def test_epochs_reshuffle() -> None:
    ctx, n = 3, 64
    stream = BatchStream(unique_tokens(n, ctx), ctx, batch_size=8, seed=1234)
    epoch0 = _epoch_windows(stream, ctx)
    epoch1 = _epoch_windows(stream, ctx)
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert epoch0 != list(range(n))  # shuffled, not in corpus order


def test_order_is_a_pure_function_of_seed_and_epoch() -> None:
    first = epoch_order(100, seed=7, epoch=3)
    torch.manual_seed(999)  # the global RNG plays no part
    torch.rand(10)
    again = epoch_order(100, seed=7, epoch=3)
    assert torch.equal(first, again)
    assert sorted(first.tolist()) == list(range(100))
    assert not torch.equal(first, epoch_order(100, seed=8, epoch=3))
    assert not torch.equal(first, epoch_order(100, seed=7, epoch=4))


def test_order_does_not_touch_the_global_rng() -> None:
    before = torch.get_rng_state()
    epoch_order(50, seed=1, epoch=0)
    stream = BatchStream(unique_tokens(10, 3), 3, batch_size=4, seed=5)
    for _ in range(5):
        stream.next_batch()
    assert torch.equal(torch.get_rng_state(), before)


def test_same_seed_same_batches_different_seed_different_batches() -> None:
    ctx = 4
    tokens = unique_tokens(50, ctx)

    def run(seed: int) -> list[list[int]]:
        stream = BatchStream(tokens, ctx, batch_size=5, seed=seed)
        return [window_index(stream.next_batch()[0], ctx) for _ in range(25)]

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize("stop_after", [0, 1, 7, 13, 20])
def test_state_dict_resumes_the_identical_batches(stop_after: int) -> None:
    ctx = 5
    tokens = unique_tokens(13, ctx, extra=4)  # 13 windows, batch 4: batches cross epochs
    reference = BatchStream(tokens, ctx, batch_size=4, seed=42)
    expected = [reference.next_batch() for _ in range(stop_after + 10)]

    stream = BatchStream(tokens, ctx, batch_size=4, seed=42)
    for _ in range(stop_after):
        stream.next_batch()
    state = stream.state_dict()
    assert state == {"windows_consumed": stop_after * 4}

    resumed = BatchStream(tokens, ctx, batch_size=4, seed=42)
    resumed.load_state_dict(state)
    for want_inputs, want_targets in expected[stop_after:]:
        inputs, targets = resumed.next_batch()
        assert torch.equal(inputs, want_inputs)
        assert torch.equal(targets, want_targets)


def test_state_dict_survives_json() -> None:
    import json

    stream = BatchStream(unique_tokens(10, 3), 3, batch_size=3, seed=0)
    stream.next_batch()
    state = json.loads(json.dumps(stream.state_dict()))
    resumed = BatchStream(unique_tokens(10, 3), 3, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch()[0], stream.next_batch()[0])


# --- validation_batches ------------------------------------------------------------------


def test_validation_batches_are_the_first_windows_in_order() -> None:
    ctx = 4
    tokens = unique_tokens(30, ctx)
    batches = validation_batches(tokens, ctx, batch_size=4, max_batches=3)
    assert len(batches) == 3
    all_windows = windows(tokens, ctx)
    for b, (inputs, targets) in enumerate(batches):
        assert inputs.shape == targets.shape == (4, ctx)
        assert inputs.dtype == torch.int64
        assert torch.equal(inputs, all_windows[4 * b : 4 * b + 4, :-1])
        assert torch.equal(targets, all_windows[4 * b : 4 * b + 4, 1:])


def test_validation_batches_are_deterministic() -> None:
    tokens = CharTokenizer().encode_to_tensor(TEXT)
    first = validation_batches(tokens, 16, batch_size=8, max_batches=4)
    torch.manual_seed(123)
    second = validation_batches(tokens, 16, batch_size=8, max_batches=4)
    assert len(first) == len(second)
    for (a_in, a_t), (b_in, b_t) in zip(first, second, strict=True):
        assert torch.equal(a_in, b_in)
        assert torch.equal(a_t, b_t)


@pytest.mark.parametrize(
    ("n_windows", "batch_size", "max_batches", "sizes"),
    [
        (30, 4, 3, [4, 4, 4]),  # capped at max_batches
        (30, 4, 100, [4] * 7 + [2]),  # all 30 windows, the last batch partial
        (8, 4, 2, [4, 4]),
        (1, 4, 5, [1]),
    ],
)
def test_validation_batches_are_capped(
    n_windows: int, batch_size: int, max_batches: int, sizes: list[int]
) -> None:
    batches = validation_batches(unique_tokens(n_windows, 3), 3, batch_size, max_batches)
    assert [len(inputs) for inputs, _ in batches] == sizes
    covered = [i for inputs, _ in batches for i in window_index(inputs, 3)]
    assert covered == list(range(sum(sizes)))


# --- the file corpus ---------------------------------------------------------------------


def _corpus_error(path: Path) -> OptionValueError:
    with pytest.raises(OptionValueError) as info:
        list(FileCorpus(FileOptions(path=str(path))).texts())
    assert info.value.key == "path"
    assert str(info.value).startswith("path: ")
    return info.value


def test_file_corpus_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    error = _corpus_error(missing)
    assert error.message == f"no such file or folder: {str(missing)!r}"


def test_file_corpus_folder_without_txt_files(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("not a .txt file")
    (tmp_path / "sub").mkdir()
    error = _corpus_error(tmp_path)
    assert error.message == f"folder {str(tmp_path)!r} has no .txt files"


def test_file_corpus_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(b"looks like text\x00\x01\x02 but is not")
    error = _corpus_error(path)
    assert "binary" in error.message
    assert "NUL" in error.message
    assert str(path) in error.message


def test_file_corpus_nul_byte_after_the_first_8_kb(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(b"plain text\n" * 10_000 + b"\x00" + b"more text\n")
    error = _corpus_error(path)
    assert error.message == (
        f"{str(path)!r} looks binary (it contains NUL bytes, the first at byte 110000)"
    )


def test_file_corpus_nul_check_is_fast_on_100_mb(tmp_path: Path) -> None:
    import time

    from slmkit_builtin.corpora import read_text_file

    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * (100 << 20) + b"\x00")
    started = time.perf_counter()
    with pytest.raises(OptionValueError, match="the first at byte 104857600"):
        read_text_file(path)
    assert time.perf_counter() - started < 5  # the read and one memchr: well under a second


def test_read_corpus_refuses_nul_from_any_corpus() -> None:
    with pytest.raises(DataError) as caught:
        read_corpus(ListCorpus(["text", "more\0text"]))
    assert str(caught.value) == (
        "the corpus contains NUL characters (the first at character 9): binary data, not text"
    )


def test_unknown_tokens_are_counted_and_warned_about_above_2_percent() -> None:
    from slmkit.data import unknown_warning

    ascii_text = "a" * 1000
    clean = prepare_splits(ascii_text, CharTokenizer(), 0.1, 8)
    assert clean.unknown_tokens == 0 and unknown_warning(clean) is None
    two_percent = prepare_splits("ж" * 20 + "a" * 980, CharTokenizer(), 0.1, 8)
    assert two_percent.unknown_tokens == 20 and unknown_warning(two_percent) is None
    cyrillic = prepare_splits("привет мир " * 100, CharTokenizer(), 0.1, 8)
    assert cyrillic.unknown_tokens == 900  # 9 letters of 11 characters, 100 times
    assert unknown_warning(cyrillic) == (
        "900 of the corpus's 1,100 tokens (81.8 %) are <UNK>, more than 2 %: the tokenizer "
        "cannot spell much of this text (the char tokenizer keeps ASCII only); check the "
        "corpus's encoding and language, or use the bpe tokenizer"
    )


@given(st.lists(st.integers(0, 3), max_size=60), st.integers(1, 9), st.integers(0, 3))
def test_count_equal_counts_across_chunk_edges(values: list[int], chunk: int, value: int) -> None:
    tokens = torch.tensor(values, dtype=torch.uint8)
    assert count_equal(tokens, value, chunk=chunk) == values.count(value)


def test_file_corpus_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"\xff\xfeab")
    error = _corpus_error(path)
    assert error.message == f"{str(path)!r} is not UTF-8 text (bad byte at offset 0)"


def test_file_corpus_non_utf8_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf" + "é".encode("latin-1") + b" au lait")
    error = _corpus_error(path)
    assert "not UTF-8" in error.message
    assert "offset 3" in error.message


def test_file_corpus_single_file(tmp_path: Path) -> None:
    path = tmp_path / "input.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    corpus = FileCorpus(FileOptions(path=str(path)))
    assert list(corpus.texts()) == ["héllo\nworld\n"]
    assert corpus.describe() == {"path": str(path), "files": 1}


def test_file_corpus_folder_is_read_in_sorted_order(tmp_path: Path) -> None:
    names = ["b.txt", "a.txt", "c/z.txt", "c/a.txt", "ab.txt"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"<{name}>", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not read")
    corpus = FileCorpus(FileOptions(path=str(tmp_path)))
    expected = sorted(tmp_path / name for name in names)
    assert corpus.files() == expected
    assert list(corpus.texts()) == [f"<{p.relative_to(tmp_path).as_posix()}>" for p in expected]
    assert corpus.describe() == {"path": str(tmp_path), "files": 5}
    assert read_corpus(corpus) == "\n".join(
        f"<{p.relative_to(tmp_path).as_posix()}>" for p in expected
    )


# --- encoding the splits where they lie ---------------------------------------------------


def sliced_splits(text: str, val_fraction: float) -> tuple[list[int], list[int]]:
    """The splits as the design defines them: slice by characters, encode each slice."""
    tok = CharTokenizer()
    cut = int(len(text) * (1 - val_fraction))
    return tok.encode(text[:cut]), tok.encode(text[cut:])


split_text = st.lists(
    st.sampled_from(["x", "y", " ", "\n", "\r", "\r\n", "é", "\u2019", "ß", "中"]),
    min_size=100,
    max_size=400,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(split_text, st.sampled_from([0.1, 0.3, 0.5]))
def test_splits_equal_encoding_the_sliced_text(text: str, val_fraction: float) -> None:
    splits = prepare_splits(text, CharTokenizer(), val_fraction, context_length=1)
    train, val = sliced_splits(text, val_fraction)
    assert splits.train.tolist() == train
    assert splits.val.tolist() == val
    assert splits.train.dtype == splits.val.dtype == torch.uint8


@pytest.mark.parametrize("ascii_only", [True, False])
def test_large_splits_equal_encoding_the_sliced_text(ascii_only: bool) -> None:
    # several chunks of the char tokenizer; the cut falls inside a chunk and on a \r\n pair
    line = "the quick brown fox\r\n" if ascii_only else "the “quick” brown fox—straße\r\n"
    text = line * 120_000
    cut_at_cr = text.index("\r", 2_000_000)
    val_fraction = 1 - (cut_at_cr + 1) / len(text)
    splits = prepare_splits(text, CharTokenizer(), val_fraction, context_length=16)
    cut = int(len(text) * (1 - val_fraction))
    assert text[cut - 1 : cut + 1] == "\r\n"  # the pair is cut in two, as slicing cuts it
    train, val = sliced_splits(text, val_fraction)
    assert torch.equal(splits.train, torch.tensor(train, dtype=torch.uint8))
    assert torch.equal(splits.val, torch.tensor(val, dtype=torch.uint8))


class SliceOnly:
    """A tokenizer with only the required methods, recording what it encodes."""

    vocab_size, pad_id = 300, None

    def __init__(self) -> None:
        self.trained: list[str] = []
        self.encoded: list[str] = []

    def train(self, text: str) -> None:
        self.trained.append(text)

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return [ord(c) % 300 for c in text]


def test_tokenizers_without_fast_paths_get_the_slices() -> None:
    tok = SliceOnly()
    splits = prepare_splits(TEXT, tok, 0.1, context_length=16)  # type: ignore[arg-type]
    assert tok.trained == [TEXT[:900]]
    assert tok.encoded == [TEXT[:900], TEXT[900:]]
    assert splits.train.dtype == torch.int16  # compact for a vocabulary of 300
    assert splits.train.tolist() == [ord(c) % 300 for c in TEXT[:900]]


def test_a_fixed_vocabulary_is_not_trained() -> None:
    class Fixed(SliceOnly):
        needs_training = False

    tok = Fixed()
    prepare_splits(TEXT, tok, 0.1, context_length=16)  # type: ignore[arg-type]
    assert tok.trained == []
    assert tok.encoded == [TEXT[:900], TEXT[900:]]


def test_a_run_on_a_mostly_unknown_corpus_warns_and_logs_it(
    write_experiment, tmp_path: Path, monkeypatch, capsys
) -> None:
    from slmkit.cli import main
    from slmkit.runlog import read_events

    monkeypatch.chdir(tmp_path)
    (tmp_path / "russian.txt").write_text("привет мир, " * 500, encoding="utf-8")
    path = write_experiment({
        "data": {"corpus": "file", "path": "russian.txt"},
        "training": {"max_steps": 1, "eval_every": 1, "checkpoint_every": 1},
        "sampling": {"every": 0},
    })  # fmt: skip
    assert main(["run", str(path), "--runs-dir", "runs"]) == 0
    out = capsys.readouterr().out
    message = (
        "4,500 of the corpus's 6,000 tokens (75.0 %) are <UNK>, more than 2 %: the tokenizer "
        "cannot spell much of this text (the char tokenizer keeps ASCII only); check the "
        "corpus's encoding and language, or use the bpe tokenizer"
    )
    assert f"warning: {message}\n" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    events = read_events(run_dir / "log.jsonl")
    assert events[0]["event"] == "run_start" and events[0]["unknown_tokens"] == 4500
    assert events[1] == {**events[1], "event": "data_warning", "message": message}
