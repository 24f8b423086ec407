"""``python -m bench [NAME ...] [options]``: run the named benchmarks (all by default).

A benchmark is a module ``bench/<name>.py`` with a ``main(argv)``; those in
``bench.BENCHMARKS`` run first, in that order, then any others, sorted. Options
(``--quick`` and the like) follow the names and are passed on to every benchmark run;
each benchmark ignores (and names) the options it does not take.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench
from bench import BENCHMARKS


def available() -> list[str]:
    """Every benchmark module in the package, the listed ones first."""
    found = {m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")}
    return [n for n in BENCHMARKS if n in found] + sorted(found - set(BENCHMARKS))


def main(argv: list[str] | None = None) -> int:
    """Dispatch to ``bench.<name>.main`` for each name given (every benchmark if none)."""
    args = sys.argv[1:] if argv is None else argv
    known = available()
    # leading words are benchmark names; everything from the first option on is passed on
    first_option = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    names, options = args[:first_option], args[first_option:]
    if not names and any(a in ("-h", "--help") for a in options):
        print(__doc__.strip())
        print(f"\nbenchmarks: {', '.join(known)}")
        print("each takes --quick (fewer repeats, smaller sizes); python -m bench NAME -h")
        return 0
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(known)}")
        return 2
    for name in names or known:
        print(f"=== bench.{name} ===", flush=True)
        module = importlib.import_module(f"bench.{name}")
        module.main(options)
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
