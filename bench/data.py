"""Data pipeline cost: reading and encoding a corpus with the char tokenizer.

The real path a run takes: ``FileCorpus`` -> ``slmkit.data.read_corpus`` ->
``slmkit.data.prepare_splits`` (split, normalize, encode, sha256), with the baseline's
``val_fraction`` 0.05 and ``context_length`` 256. Corpora:

* tinyshakespeare (``../shared/data/tinyshakespeare.txt`` from the project root; skipped
  with a message if missing; read in place, never copied);
* a generated ASCII corpus of random words (100 MB; 10 MB with ``--quick``);
* the same with about 1% non-ASCII characters (``é``, curly quotes, dashes...), which
  sends ``normalize`` down its Unicode path (NFKD + translate).

Peak memory: torch buffers are invisible to ``tracemalloc``, so each case runs in a fresh
subprocess that reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss``; the figure is the
delta over a baseline subprocess that only imports the same modules. After recording its
peak, a case subprocess also times the pieces of the path (normalize, encode, sha256) on
the whole text, to show where the time goes.

    uv run python -m bench data [--quick] [--size-mb N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import (
    ROOT,
    TINYSHAKESPEARE,
    fmt_spread,
    machine_line,
    parse_args,
    spread,
    table,
    write_results,
)

VAL_FRACTION = 0.05
CONTEXT_LENGTH = 256
TARGET_SECONDS = 60.0
#: non-ASCII decorations: each adds one non-ASCII character (and keeps a word readable)
DECORATIONS = (
    lambda w: w[:-1] + "é",
    lambda w: "\u201c" + w + '"',  # “word"
    lambda w: w + "\u201d",  # word”
    lambda w: "\u2018" + w + "'",  # ‘word'
    lambda w: w + "\u2019s",  # word’s
    lambda w: w + "\u2014",  # word—
    lambda w: w.replace("a", "à", 1) if "a" in w else w + "ü",
)


# -- corpus generation -------------------------------------------------------------------


def _block(rng: random.Random, words: list[str], n_words: int, non_ascii: float) -> str:
    """``n_words`` random words in lines of 8-16; a fraction ``non_ascii`` of them decorated."""
    picked = rng.choices(words, k=n_words)
    if non_ascii:
        for i in range(n_words):
            if rng.random() < non_ascii:
                picked[i] = rng.choice(DECORATIONS)(picked[i])
    lines, i = [], 0
    while i < n_words:
        n = rng.randint(8, 16)
        lines.append(" ".join(picked[i : i + n]))
        i += n
    return "\n".join(lines) + "\n"


def generate_corpus(path: Path, size_bytes: int, *, non_ascii_chars: float, seed: int) -> dict:
    """Write about ``size_bytes`` of random-word text; quick: a 1 MB block, rotated."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [26 - i for i in range(len(letters))]
    words = [
        "".join(rng.choices(letters, weights=weights, k=rng.randint(2, 10))) for _ in range(5000)
    ]
    words += [w.capitalize() for w in words[:500]]
    # about 7 characters a word (6.5 letters + a separator): decorate 7x the char fraction
    block = _block(rng, words, 150_000, non_ascii_chars * 7)
    started = time.perf_counter()
    written = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        while written < size_bytes:
            cut = rng.randrange(len(block))
            piece = block[cut:] + block[:cut]
            data = piece.encode("utf-8")[: size_bytes - written]
            text = data.decode("utf-8", errors="ignore")
            f.write(text)
            written += len(text.encode("utf-8"))
    n_chars = len(block)
    n_non_ascii = sum(1 for ch in block if ord(ch) > 127)
    return {
        "bytes": path.stat().st_size,
        "non_ascii_fraction": n_non_ascii / n_chars,
        "generate_s": time.perf_counter() - started,
    }


# -- the measured subprocess -------------------------------------------------------------


def _maxrss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def worker(case: str, path: str | None) -> dict[str, Any]:
    """Run inside a fresh interpreter: one case, or only the imports (``baseline``)."""
    import hashlib

    import torch
    from slmkit_builtin import char
    from slmkit_builtin.char import CharTokenizer, normalize
    from slmkit_builtin.corpora import FileCorpus, FileOptions

    import slmkit.data
    from slmkit.data import encode, prepare_splits, read_corpus

    tokenizer = CharTokenizer()
    if case == "baseline":
        return {"maxrss": _maxrss_bytes()}
    assert path is not None
    corpus = FileCorpus(FileOptions(path=path))
    t0 = time.perf_counter()
    text = read_corpus(corpus)
    t1 = time.perf_counter()
    splits = prepare_splits(text, tokenizer, VAL_FRACTION, CONTEXT_LENGTH)
    t2 = time.perf_counter()
    peak = _maxrss_bytes()
    out: dict[str, Any] = {
        "maxrss": peak,
        "read_s": t1 - t0,
        "prepare_s": t2 - t1,
        "total_s": t2 - t0,
        "chars": len(text),
        "tokens": len(splits.train) + len(splits.val),
        "unk_tokens": int((splits.train == 1).sum() + (splits.val == 1).sum()),
        "dtype": str(splits.train.dtype),
    }
    del splits
    # where the time goes (after the peak is recorded: these may raise it)
    parts: dict[str, float] = {}
    if not text.isascii():
        # first-use tables the char module builds lazily (functools.cache), by whatever name
        tables = [f for f in vars(char).values() if callable(getattr(f, "cache_clear", None))]
        t = time.perf_counter()
        for f in tables:
            f.cache_clear()
            f()
        parts["lazy_tables_s"] = time.perf_counter() - t
    t = time.perf_counter()
    normalized = normalize(text)
    parts["normalize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    encode(tokenizer, normalized)
    parts["encode_after_normalize_s"] = time.perf_counter() - t
    del normalized
    t = time.perf_counter()
    digest = getattr(slmkit.data, "text_sha256", None)
    if digest is not None:
        digest(text)
    else:
        hashlib.sha256(text.encode("utf-8")).hexdigest()
    parts["sha256_s"] = time.perf_counter() - t
    out["parts"] = parts
    out["torch_threads"] = torch.get_num_threads()
    return out


def run_worker(case: str, path: Path | None = None) -> dict[str, Any]:
    """One fresh subprocess; its JSON answer."""
    cmd = [sys.executable, "-m", "bench.data", "--worker", case]
    if path is not None:
        cmd += ["--path", str(path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the benchmark -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every case, print the table, write ``bench/results/data.json``."""
    parser = argparse.ArgumentParser(prog="bench.data", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 MB corpora, 1 repeat")
    parser.add_argument("--size-mb", type=float, default=None, help="default 100 (quick 10)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parse_args(parser, argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.path)))
        return {}
    size_mb = args.size_mb or (10.0 if args.quick else 100.0)
    repeats = args.repeats or (1 if args.quick else 3)
    print(machine_line())
    print(
        f"path: FileCorpus -> read_corpus -> prepare_splits(char, val_fraction {VAL_FRACTION}, "
        f"context {CONTEXT_LENGTH}); {repeats} repeat(s), each case in a fresh subprocess"
    )

    results: dict[str, Any] = {"repeats": repeats, "size_mb": size_mb, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="slmkit-bench-data-") as tmp:
        cases: list[tuple[str, Path, dict[str, Any]]] = []
        shakespeare = TINYSHAKESPEARE.resolve()
        if shakespeare.is_file():
            cases.append(("tinyshakespeare", shakespeare, {"bytes": shakespeare.stat().st_size}))
        else:
            print(f"skipping tinyshakespeare: {shakespeare} is missing")
            results["skipped"] = [f"tinyshakespeare: {shakespeare} is missing"]
        for name, fraction, seed in (("ascii", 0.0, 1), ("non-ascii ~1%", 0.01, 2)):
            path = Path(tmp) / f"corpus-{seed}.txt"
            info = generate_corpus(path, int(size_mb * 1e6), non_ascii_chars=fraction, seed=seed)
            label = f"{name} {size_mb:g} MB"
            print(
                f"generated {label}: {info['bytes'] / 1e6:.1f} MB in {info['generate_s']:.1f} s, "
                f"{100 * info['non_ascii_fraction']:.2f}% non-ASCII characters"
            )
            cases.append((label, path, info))

        baselines = []
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in cases}
        for _ in range(repeats):
            baselines.append(run_worker("baseline")["maxrss"])
            for label, path, _ in cases:
                runs[label].append(run_worker("run", path))
        base = spread(baselines)["median"]
        results["baseline_maxrss_mb"] = {k: v / 1e6 for k, v in spread(baselines).items()}

        rows, part_rows = [], []
        for label, _, info in cases:
            r = runs[label]
            size = info["bytes"]
            total = spread([x["total_s"] for x in r])
            rate = spread([size / 1e6 / x["total_s"] for x in r])
            delta = [max(0, x["maxrss"] - base) for x in r]
            mult = spread([d / size for d in delta])
            rows.append(
                [
                    label,
                    f"{size / 1e6:.1f}",
                    fmt_spread(spread([x["read_s"] for x in r]), "{:.2f}"),
                    fmt_spread(spread([x["prepare_s"] for x in r]), "{:.2f}"),
                    fmt_spread(total, "{:.2f}"),
                    fmt_spread(rate, "{:.0f}"),
                    fmt_spread(spread([d / 1e6 for d in delta]), "{:.0f}"),
                    fmt_spread(mult, "{:.2f}") + "x",
                ]
            )
            parts = {k: spread([x["parts"][k] for x in r]) for k in r[0]["parts"]}
            part_rows.append(
                [
                    label,
                    *(
                        fmt_spread(parts[k], "{:.2f}") if k in parts else "-"
                        for k in (
                            "normalize_s",
                            "lazy_tables_s",
                            "encode_after_normalize_s",
                            "sha256_s",
                        )
                    ),
                ]
            )
            results["cases"][label] = {
                "bytes": size,
                "chars": r[0]["chars"],
                "tokens": r[0]["tokens"],
                "unk_tokens": r[0]["unk_tokens"],
                "dtype": r[0]["dtype"],
                "generation": info,
                "total_s": total,
                "mb_per_s": rate,
                "peak_rss_delta_mb": {k: v / 1e6 for k, v in spread(delta).items()},
                "peak_rss_delta_over_corpus": mult,
                "parts_s": parts,
                "runs": r,
                "target_met": total["max"] < TARGET_SECONDS,
            }
    print()
    print(
        table(
            [
                "corpus",
                "MB",
                "read s",
                "split+encode s",
                "total s",
                "MB/s",
                "peak RSS delta MB",
                "peak / corpus size",
            ],
            rows,
        )
    )
    print(
        f"\n(median (min–max) over {repeats} repeat(s); RSS delta over an import-only "
        f"subprocess of {base / 1e6:.0f} MB; MB = 10^6 bytes of the file)"
    )
    print("\nwhere the time goes (each on the whole text, after the measured run):")
    print(
        table(
            ["corpus", "normalize s", "lazy tables s (once)", "encode s", "sha256 s"],
            part_rows,
        )
    )
    for label, case in results["cases"].items():
        if case["unk_tokens"]:
            print(f"{label}: {case['unk_tokens']:,} characters encoded to <UNK>")
    worst = max(results["cases"].values(), key=lambda c: c["total_s"]["max"])
    multiples = ", ".join(
        f"{label} {case['peak_rss_delta_over_corpus']['max']:.1f}x"
        for label, case in results["cases"].items()
    )
    print(
        f"\ntarget: well under {TARGET_SECONDS:.0f} s and a few times the corpus size: slowest "
        f"case {worst['total_s']['max']:.1f} s; peak RSS delta / corpus size (max): {multiples}"
    )
    path = write_results("data-quick" if args.quick else "data", results)
    print(f"wrote {path.relative_to(path.parents[2])}")
    return results


if __name__ == "__main__":
    main()
