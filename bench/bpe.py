"""BPE tokenizer cost: training to 512 and 1024 tokens, encoding, compression.

On tinyshakespeare (``../shared/data/tinyshakespeare.txt`` from the project root, about
1 MB; skipped with a message if missing; read in place, never copied), for each target
vocabulary size:

* training: ``BPETokenizer.train`` on the whole text (``vocab_size - 256`` merges);
* encoding: ``encode_to_tensor`` of the whole text with the trained merges;
* compression: characters per token of the whole text (1.0 for the char tokenizer), and
  UTF-8 bytes per token;
* a check that ``decode(encode(text)) == text``.

Timings are median (min–max) over the repeats, in this process.

    uv run python -m bench bpe [--quick] [--repeats R]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from bench import (
    TINYSHAKESPEARE,
    fmt_spread,
    machine_line,
    parse_args,
    spread,
    table,
    write_results,
)

VOCAB_SIZES = (512, 1024)
TARGET_TRAIN_SECONDS = 60.0


def measure(text: str, vocab_size: int, repeats: int) -> dict[str, Any]:
    """Train and encode ``repeats`` times; the timings and what the last run produced."""
    from slmkit_builtin.bpe import BPETokenizer

    train_s, encode_s = [], []
    for _ in range(repeats):
        tokenizer = BPETokenizer(vocab_size)
        started = time.perf_counter()
        tokenizer.train(text)
        train_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        ids = tokenizer.encode_to_tensor(text)
        encode_s.append(time.perf_counter() - started)
    n_bytes = len(text.encode("utf-8"))
    return {
        "vocab_size": vocab_size,
        "merges": len(tokenizer.merges),
        "train_s": spread(train_s),
        "encode_s": spread(encode_s),
        "encode_mb_per_s": spread([n_bytes / 1e6 / s for s in encode_s]),
        "tokens": len(ids),
        "chars_per_token": len(text) / len(ids),
        "bytes_per_token": n_bytes / len(ids),
        "round_trip": tokenizer.decode(ids) == text,
        "target_met": max(train_s) < TARGET_TRAIN_SECONDS,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every vocabulary size, print the table, write ``bench/results/bpe.json``."""
    parser = argparse.ArgumentParser(prog="bench.bpe", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick 1)")
    args = parse_args(parser, argv)
    repeats = args.repeats or (1 if args.quick else 3)
    print(machine_line())

    path = TINYSHAKESPEARE.resolve()
    if not path.is_file():
        print(f"skipping: {path} is missing")
        return {"skipped": [f"tinyshakespeare: {path} is missing"]}
    text = path.read_text(encoding="utf-8")
    print(
        f"corpus: tinyshakespeare, {len(text):,} characters, "
        f"{len(text.encode('utf-8')):,} UTF-8 bytes; {repeats} repeat(s)"
    )

    results: dict[str, Any] = {"repeats": repeats, "corpus_chars": len(text), "cases": {}}
    rows = []
    for vocab_size in VOCAB_SIZES:
        case = measure(text, vocab_size, repeats)
        results["cases"][str(vocab_size)] = case
        rows.append(
            [
                vocab_size,
                case["merges"],
                fmt_spread(case["train_s"], "{:.2f}"),
                fmt_spread(case["encode_s"], "{:.2f}"),
                fmt_spread(case["encode_mb_per_s"], "{:.1f}"),
                f"{case['tokens']:,}",
                f"{case['chars_per_token']:.3f}",
                f"{case['bytes_per_token']:.3f}",
                "yes" if case["round_trip"] else "NO",
            ]
        )
    print()
    print(
        table(
            [
                "vocab",
                "merges",
                "train s",
                "encode s",
                "encode MB/s",
                "tokens",
                "chars/token",
                "bytes/token",
                "round trip",
            ],
            rows,
        )
    )
    print(f"\n(median (min–max) over {repeats} repeat(s); MB = 10^6 UTF-8 bytes)")
    slowest = max(c["train_s"]["max"] for c in results["cases"].values())
    print(
        f"target: training under {TARGET_TRAIN_SECONDS:.0f} s: slowest {slowest:.1f} s "
        f"({'met' if slowest < TARGET_TRAIN_SECONDS else 'NOT met'})"
    )
    out = write_results("bpe", results)
    print(f"wrote {out.relative_to(out.parents[2])}")
    return results


if __name__ == "__main__":
    main()
