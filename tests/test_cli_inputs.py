"""Whatever a user types, every command ends cleanly: exit 0 or a one-line error.

A property test feeds random strings to every argument of every command (the list comes
from the argparse parser, so a new option is covered without touching this file); the
other tests pin down the cases it found or cannot reach: NaN and infinities, seeds out of
range, output paths that are folders, bytes that are not UTF-8, and a stdout closed early.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import TINY, events, merge
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slmkit.arguments import build_parser, finite_float
from slmkit.cli import main

#: a run of this trains one step of a 5,680-parameter model on a 30 KB corpus: well under a
#: second, so the property test may let `run` train whenever a random value is accepted
FAST = merge(TINY, {
    "experiment": {"runs_dir": "runs"},
    "data": {"corpus": "file", "path": "corpus.txt"},
    "model": {"n_layers": 1, "d_model": 16, "d_ff": 32, "context_length": 16},
    "training": {"max_steps": 1, "eval_every": 1, "eval_batches": 1, "checkpoint_every": 1},
    "sampling": {"every": 0, "max_new_tokens": 4},
})  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A folder with a tiny experiment, its corpus, and one finished run under runs/."""
    root = tmp_path_factory.mktemp("cli_inputs")
    (root / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 700)
    (root / "tiny.toml").write_text(tomli_w.dumps(FAST), encoding="utf-8")
    with inside(root):
        code, _, err = run_main("run", "tiny.toml")
    assert code == 0, err
    (run_dir,) = (root / "runs").iterdir()
    inputs = {name: (root / name).read_bytes() for name in ("corpus.txt", "tiny.toml")}
    return {"root": root, "run": f"runs/{run_dir.name}", "run_id": run_dir.name,
            "inputs": inputs}  # fmt: skip


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Run relative paths from ``folder`` (and come back, whatever happens)."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def run_main(*args: str) -> tuple[int, str, str]:
    """``slmkit ARGS`` in this process: exit code (argparse's too), stdout, stderr.

    Any exception other than argparse's SystemExit escapes and fails the test: that
    would be a traceback for the user.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: bad usage (2), or --help / --version (0)
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, by name."""
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments of a subcommand that take a value (options and positionals)."""
    return [a for a in parser._actions if a.nargs != 0 and not isinstance(a, argparse._HelpAction)]


def flags(parser: argparse.ArgumentParser) -> list[str]:
    """The options of a subcommand that take no value (``--json``, ``--no-cache``)."""
    return [
        a.option_strings[-1]
        for a in parser._actions
        if a.nargs == 0 and not isinstance(a, argparse._HelpAction)
    ]


def valid_positionals(command: str, work: dict[str, Any], skip: str | None) -> list[str]:
    """Good values for the positionals of ``command`` (except ``skip``, which is fuzzed)."""
    good = {"experiment": "tiny.toml", "run": work["run"], "runs": work["run_id"]}
    parser = subcommands()[command]
    return [good[a.dest] for a in parser._actions
            if not a.option_strings and a.dest in good and a.dest != skip]  # fmt: skip


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root``: relative path -> (size, modification time)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            stat = path.stat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


#: values worth trying everywhere: numbers that are not, paths that exist, shapes of --set
INTERESTING = ["nan", "NaN", "inf", "-inf", "1e999", "-1", "0", "1", "2.5", "", " ", ".",
               "tiny.toml", "corpus.txt", "runs", "latest.pt", "=", "a=b", "\udcff",
               "model.n_layers=nan", "training.max_steps=1", "experiment.seed=-1",
               "optimizer.learning_rate=inf", "model.n_layers=1,2", "cpu", "cuda"]  # fmt: skip


def not_above_1000(text: str) -> bool:
    """Whether ``text`` is not an integer above 1,000 (as argparse's ``int`` reads it)."""
    try:
        return int(text) <= 1000
    except ValueError:
        return True


#: random text as a user might type it. Excluded: NUL (no command line can carry it), path
#: separators and ".." (so that whatever is written stays in this test's folder), and
#: numbers above 1,000 (a valid --max-new-tokens of 10**7 samples for hours; the huge one
#: is tested on its own below)
TYPED = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\x00"),
    max_size=12,
).filter(lambda v: ".." not in v and not_above_1000(v))


@st.composite
def invocations(draw: st.DrawFn, work: dict[str, Any]) -> tuple[str, list[str], str | None, str]:
    """``(command, argv, option, value)``: one argument of one command set to random text
    (``option`` is None for a positional)."""
    commands = subcommands()
    command = draw(st.sampled_from(sorted(commands)))
    parser = commands[command]
    takes_values = arguments(parser)
    # a command with no argument that takes a value (plugins) gets the text as a stray one
    action = draw(st.sampled_from(takes_values)) if takes_values else None
    value = draw(st.one_of(st.sampled_from(INTERESTING), TYPED))
    switches = flags(parser)
    extra = draw(st.lists(st.sampled_from(switches), max_size=2, unique=True)) if switches else []
    argv = [command, *valid_positionals(command, work, action.dest if action else None)]
    if action is not None and action.option_strings:
        argv.append(f"{action.option_strings[-1]}={value}")  # "=": values may start with "-"
        option = action.option_strings[-1]
    else:
        argv.append(value)
        option = None
    return command, [*argv, *extra], option, value


def test_the_parser_lists_every_command_and_its_arguments() -> None:
    """What the property test draws from (a new command or option shows up here)."""
    commands = subcommands()
    assert sorted(commands) == [
        "compare", "eval", "export", "plugins", "run", "runs", "sample", "scaling", "validate",
    ]  # fmt: skip
    fuzzed = {name: sorted(a.dest for a in arguments(p)) for name, p in commands.items()}
    assert fuzzed["sample"] == ["device", "max_new_tokens", "prompt", "run", "seed",
                                "temperature", "top_k", "top_p"]  # fmt: skip
    assert fuzzed["scaling"] == ["budget", "leave_out", "out", "png", "resamples", "runs",
                                 "runs_dir", "seed", "sweep"]  # fmt: skip
    assert fuzzed["export"] == ["runs", "runs_dir", "to"]
    assert fuzzed["run"] == [
        "experiment", "init_from", "jobs", "resume", "resume_sweep", "runs_dir", "seeds", "set",
        "sweep", "sweep_member", "threads",
    ]  # fmt: skip


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(data=st.data())
def test_random_strings_in_any_argument_end_cleanly(workdir: dict[str, Any], data) -> None:
    """Exit 0 or 2, a one-line ``slmkit: error:`` at most, never a traceback or an
    ``internal error``, and no file written outside the runs folder and the named outputs.

    Exit 1 means "the input was accepted, then the work failed": it is allowed for ``run``
    (a run folder that cannot be created where ``--runs-dir`` points, a run that fails
    after it started) and ``sample`` (out of memory), with a one-line error. Every command
    is fuzzed, ``run`` included: its experiment trains one step of a tiny model, so an
    accepted value costs well under a second.
    """
    root = workdir["root"]
    command, argv, option, value = data.draw(invocations(workdir))
    before = tree(root)
    with inside(root):
        code, _, err = run_main(*argv)
    event(f"{command}: exit {code}")  # pytest --hypothesis-show-statistics shows the mix
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if code == 1:
        assert command in ("run", "sample"), (argv, err)
        assert err.startswith("slmkit: error: ") and err.count("\n") == 1, (argv, err)
    else:
        assert code in (0, 2), (argv, code, err)
    if code == 2 and not err.startswith("usage:"):
        assert err.startswith("slmkit: error: ") and err.count("\n") == 1, (argv, err)
    # what may have been written: the runs folder (the default or the one named) and the
    # outputs named on the command line; nothing else, and nothing changed or removed
    allowed = [root / "runs"]
    if option in ("--runs-dir", "--out", "--png") and value:
        allowed.append(root / value)  # "." included: the user chose this folder
    allowed = [a.resolve() for a in allowed]
    after = tree(root)
    # An output the user named after an input (`compare RUN --out=tiny.toml`, allowed)
    # replaces it: put it back, for the examples and the tests that come after.
    for name, content in workdir["inputs"].items():
        if not (root / name).is_file() or (root / name).read_bytes() != content:
            (root / name).write_bytes(content)
    touched = {p for p in after if before.get(p) != after[p]} | (before.keys() - after.keys())
    outside = [
        p for p in touched if not any((root / p).resolve().is_relative_to(a) for a in allowed)
    ]
    assert outside == [], (argv, outside)


# -- what the property found, and what it cannot reach --------------------------------------


def numeric_options() -> list[tuple[str, str]]:
    """``(command, option)`` of every option that takes a number."""
    return [(name, a.option_strings[-1]) for name, p in subcommands().items()
            for a in p._actions if a.type in (int, float, finite_float)]  # fmt: skip


def test_no_float_option_goes_around_finite_float() -> None:
    floats = [(name, a.option_strings) for name, p in subcommands().items()
              for a in p._actions if a.type is float]  # fmt: skip
    assert floats == []
    assert ("sample", "--temperature") in numeric_options()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
@pytest.mark.parametrize(("command", "option"), numeric_options())
def test_every_numeric_option_refuses_nan_and_infinities_naming_it(
    workdir, command: str, option: str, value: str
) -> None:
    argv = [command, *valid_positionals(command, workdir, None), f"{option}={value}"]
    with inside(workdir["root"]):
        code, out, err = run_main(*argv)
    assert code == 2 and out == ""
    last = err.splitlines()[-1]
    assert f"argument {option}: " in last
    assert (
        f"must be a finite number, got {value!r}" in last or f"invalid int value: {value!r}" in last
    )


@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**70)])
def test_a_seed_out_of_range_is_one_line(workdir, seed: str) -> None:
    with inside(workdir["root"]):
        code, _, err = run_main("sample", workdir["run"], "--seed", seed)
    assert (code, err) == (2, "slmkit: error: --seed: must be in [0, 2**63)\n")
    with inside(workdir["root"]):
        code, _, err = run_main("validate", "tiny.toml", "--set", f"experiment.seed={seed}")
    bound = "must be >= 0" if seed == "-1" else "must be < 2**63"
    assert (code, err) == (2, f"slmkit: error: tiny.toml: experiment.seed: {bound}, got {seed}\n")


@pytest.mark.parametrize(
    "argv",
    [["eval", "RUN", "--device=--"], ["sample", "RUN", "--temperature=--"],
     ["sample", "RUN", "--prompt=--"], ["run", "tiny.toml", "--set=--"]],
)  # fmt: skip
def test_an_option_given_as_dash_dash_is_a_missing_argument(workdir, argv: list[str]) -> None:
    """CPython's argparse makes ``--opt=--`` an empty list, past ``type`` and ``choices``."""
    argv = [workdir["run"] if a == "RUN" else a for a in argv]
    with inside(workdir["root"]):
        code, _, err = run_main(*argv)
    option = argv[-1].partition("=")[0]
    assert code == 2
    assert (
        err.splitlines()[-1] == f"slmkit {argv[0]}: error: argument {option}: expected one argument"
    )


def test_an_output_that_is_a_folder_is_one_line(workdir) -> None:
    for folder in (".", "runs", workdir["run"]):
        with inside(workdir["root"]):
            code, _, err = run_main("compare", workdir["run"], "--out", folder)
        assert (code, err) == (2, f"slmkit: error: {folder}: is a folder; name the file to write\n")


def test_a_huge_max_new_tokens_is_out_of_memory_in_one_line(workdir) -> None:
    with inside(workdir["root"]):
        code, out, err = run_main("sample", workdir["run"], "--max-new-tokens", str(10**13))
    assert (code, out) == (1, "")
    assert err.startswith("slmkit: error: out of memory: ") and err.count("\n") == 1
    assert err.endswith("(a smaller model, batch or --max-new-tokens may fit)\n")


def test_set_values_that_are_not_utf8_are_refused(workdir) -> None:
    with inside(workdir["root"]):
        code, _, err = run_main("run", "tiny.toml", "--set", "experiment.name=caf\udce9")
    assert code == 2
    assert err == (
        "slmkit: error: --set: experiment.name: 'experiment.name=caf\\udce9' is not valid "
        "UTF-8 text (check the terminal)\n"
    )


def cli_bytes(*args: str | bytes, cwd: Path, stdout: Any = subprocess.PIPE) -> Any:
    """``python -m slmkit ARGS`` in a child process, arguments given as str or raw bytes."""
    return subprocess.run(
        [sys.executable, "-m", "slmkit", *args], cwd=cwd, stdout=stdout,
        stderr=subprocess.PIPE, timeout=300, check=False,
    )  # fmt: skip


def test_a_prompt_in_bytes_that_are_not_utf8_is_echoed_as_typed(workdir) -> None:
    done = cli_bytes("sample", workdir["run"], "--prompt", b"caf\xe9 ", "--max-new-tokens", "3",
                     cwd=workdir["root"])  # fmt: skip
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout.startswith(b"caf\xe9 ") and len(done.stdout) == len(b"caf\xe9 ") + 3 + 1


@pytest.mark.parametrize(
    "args", [["runs"], ["runs", "--json"], ["plugins"], ["plugins", "--json"]],
    ids=["runs", "runs-json", "plugins", "plugins-json"],
)  # fmt: skip
def test_a_closed_stdout_ends_the_command_cleanly(workdir, args: list[str]) -> None:
    """``slmkit runs | head -1``, made certain: the reading end is closed before any write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = cli_bytes(*args, cwd=workdir["root"], stdout=write_end)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, b"")


def test_a_run_whose_stdout_closes_trains_to_the_end(workdir, tmp_path: Path) -> None:
    """The console goes quiet; the run goes on and finishes, its log whole."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = cli_bytes("run", str(workdir["root"] / "tiny.toml"), "--runs-dir", str(tmp_path),
                         cwd=workdir["root"], stdout=write_end)  # fmt: skip
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, b"")
    (run_dir,) = tmp_path.iterdir()
    assert [e["step"] for e in events(run_dir, "train_step")] == [1]
    (end,) = events(run_dir, "run_end")
    assert end["summary"]["steps"] == 1
