"""Runs side by side: `slmkit runs`, `slmkit compare`, sweeps, from real tiny runs."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import TINY, merge, run_main
from hypothesis import given
from hypothesis import strategies as st

from slmkit.compare import (
    FIGURE_DPI,
    FIGURE_INCHES,
    LEGEND_LINE_CHARS,
    differing_keys,
    figure_size,
    legend_keys,
    loss_curves_figure,
    loss_curves_png,
)
from slmkit.errors import SlmkitError
from slmkit.progress import Console
from slmkit.runlog import read_events
from slmkit.runs import list_runs, read_run
from slmkit.runs_table import format_value
from slmkit.sweep import axis_keys, grid, parse_sweeps, split_values
from slmkit.table import format_table

SWEEP = ["--sweep", "model.n_layers=1,2", "--sweep", "optimizer.learning_rate=1e-3,3e-3"]


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory) -> dict[str, Any]:
    """A 2 x 2 sweep of tiny runs, plus one plain run, in one runs folder."""
    root = tmp_path_factory.mktemp("runs_side_by_side")
    experiment = root / "tiny.toml"
    experiment.write_text(tomli_w.dumps(merge(TINY, {})), encoding="utf-8")
    runs_dir = root / "runs"
    code, out, err = run_main("run", str(experiment), "--runs-dir", str(runs_dir), *SWEEP)
    assert code == 0, err
    sweep_id = re.search(r"sweep (sweep-\S+): 4 runs of", out).group(1)
    code, _, err = run_main("run", str(experiment), "--runs-dir", str(runs_dir),
                            "--set", "training.max_steps=3")  # fmt: skip
    assert code == 0, err
    return {"root": root, "runs_dir": runs_dir, "sweep_id": sweep_id, "sweep_out": out}


def folders(runs_dir: Path) -> list[Path]:
    return sorted(p for p in runs_dir.iterdir() if p.is_dir())


def run_start(run_dir: Path) -> dict[str, Any]:
    return next(e for e in read_events(run_dir / "log.jsonl") if e["event"] == "run_start")


# -- sweeps ------------------------------------------------------------------------------


def test_a_2x2_sweep_makes_4_tagged_run_folders_and_one_table(sweep_runs) -> None:
    runs_dir, sweep_id = sweep_runs["runs_dir"], sweep_runs["sweep_id"]
    tagged = [p for p in folders(runs_dir) if (run_start(p)["sweep"] or {}).get("id") == sweep_id]
    assert len(tagged) == 4
    starts = sorted((run_start(p)["sweep"] for p in tagged), key=lambda s: s["index"])
    assert [s["overrides"] for s in starts] == [
        ["model.n_layers=1", "optimizer.learning_rate=1e-3"],
        ["model.n_layers=1", "optimizer.learning_rate=3e-3"],
        ["model.n_layers=2", "optimizer.learning_rate=1e-3"],
        ["model.n_layers=2", "optimizer.learning_rate=3e-3"],
    ]
    assert {s["size"] for s in starts} == {4}
    # The resolved experiments really differ as the grid says.
    layers = sorted(read_run(p).experiment["model"]["n_layers"] for p in tagged)
    assert layers == [1, 1, 2, 2]

    out = sweep_runs["sweep_out"]
    tables = [line for line in out.splitlines() if line.startswith("RUN_ID")]
    assert len(tables) == 1  # one comparison table, after all the runs
    table = out[out.index(tables[0]) :].splitlines()
    assert table[0].split()[-2:] == ["model.n_layers", "optimizer.learning_rate"]
    rows = [line.split() for line in table[1:5]]
    assert [(r[-2], r[-1]) for r in rows] == [("1", "0.001"), ("1", "0.003"),
                                              ("2", "0.001"), ("2", "0.003")]  # fmt: skip
    assert all(r[2] == "finished" and r[3] == "6/6" for r in rows)
    assert f"slmkit compare --sweep {sweep_id}" in out


def test_sweep_values_are_checked_before_any_run(write_experiment, tmp_path: Path) -> None:
    path = write_experiment()
    runs_dir = tmp_path / "runs"
    code, _, err = run_main("run", str(path), "--runs-dir", str(runs_dir),
                            "--sweep", "model.n_layers=2,two")  # fmt: skip
    assert code == 2
    assert "model.n_layers: expected an integer" in err and len(err.splitlines()) == 1
    assert not runs_dir.exists()


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("model.n_layers", "--sweep: model.n_layers: expected KEY=V1,V2,..."),
        ("model.n_layers=", "expected KEY=V1,V2,..."),
        ("model.n_layers=1,,2", "expected KEY=V1,V2,..."),
        (",model.d_ff=[1,2]", "expected KEY=V1,V2,..."),
        (
            "model.n_layers,model.d_ff=1,2",
            "--sweep: model.n_layers,model.d_ff: 1: expected "
            "[V1,V2,...] with one value for each of the 2 keys",
        ),
        ("model.n_layers,model.d_ff=[1,64],[2]", "[2]: expected [V1,V2,...]"),
        ("model.n_layers,model.d_ff=[1,two]", "model.d_ff: expected an integer"),
        ("model.n_layers,model.n_layers=[1,2]", "--sweep: model.n_layers: given twice"),
    ],
)
def test_malformed_sweeps_are_one_line_errors(write_experiment, tmp_path, sweep, message) -> None:
    code, _, err = run_main("run", str(write_experiment()), "--runs-dir", str(tmp_path / "r"),
                            "--sweep", sweep)  # fmt: skip
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_a_key_swept_twice_and_sweep_with_resume_are_errors(write_experiment, tmp_path) -> None:
    path = str(write_experiment())
    code, _, err = run_main("run", path, "--sweep", "model.n_layers=1", "--sweep",
                            "model.n_layers=2", "--runs-dir", str(tmp_path / "r"))  # fmt: skip
    assert code == 2 and "model.n_layers: given twice" in err
    code, _, err = run_main("run", path, "--sweep", "model.n_layers=1,2", "--resume", "x")
    assert code == 2 and "cannot be combined with --resume" in err
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
            env.setenv(key, value)  # as under torchrun
        code, _, err = run_main("run", path, "--sweep", "model.n_layers=1,2")
    assert code == 2 and "--sweep cannot run under torchrun" in err
    assert not (tmp_path / "r").exists()


TOML_VALUES = st.one_of(
    st.integers(), st.lists(st.integers(), max_size=3), st.text(alphabet="ab,c ", max_size=5)
)


def toml(value: Any) -> str:
    """``value`` in TOML syntax, as a user types it after ``KEY=``."""
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def parse_toml(text: str) -> Any:
    """The value of TOML text ``text``."""
    return tomllib.loads(f"v = {text}")["v"]


@given(st.lists(TOML_VALUES, min_size=1, max_size=4))
def test_split_values_keeps_commas_inside_lists_and_strings(values: list[Any]) -> None:
    raw = ",".join(toml(v) for v in values)
    parsed = [parse_toml(piece) for piece in split_values(raw)]
    assert parsed == values


def test_grid_varies_the_first_sweep_slowest() -> None:
    combos = grid(parse_sweeps(["a=1,2", "b=x,y,z"]))
    assert combos[:4] == [["a=1", "b=x"], ["a=1", "b=y"], ["a=1", "b=z"], ["a=2", "b=x"]]
    assert len(combos) == 6


def test_a_zipped_axis_sets_its_keys_together() -> None:
    axes = parse_sweeps(["a,b=[1,'x,y'],[2,[3, 4]]", "c=5,6"])
    assert grid(axes) == [
        ["a=1", "b='x,y'", "c=5"], ["a=1", "b='x,y'", "c=6"],
        ["a=2", "b=[3, 4]", "c=5"], ["a=2", "b=[3, 4]", "c=6"],
    ]  # fmt: skip
    assert axis_keys(axes) == ["a", "b", "c"]


@given(
    st.integers(2, 3).flatmap(
        lambda k: st.lists(st.lists(TOML_VALUES, min_size=k, max_size=k), min_size=1, max_size=3)
    )
)
def test_a_zipped_axis_gives_each_key_its_item(rows: list[list[Any]]) -> None:
    keys = [f"k{i}" for i in range(len(rows[0]))]
    raw = ",".join("[" + ", ".join(toml(v) for v in row) + "]" for row in rows)
    combos = grid(parse_sweeps([f"{','.join(keys)}={raw}"]))
    assert [[o.partition("=")[0] for o in combo] for combo in combos] == [keys] * len(rows)
    parsed = [[parse_toml(o.partition("=")[2]) for o in combo] for combo in combos]
    assert parsed == rows


def test_a_zipped_sweep_runs_one_run_per_value_with_its_keys_together(
    write_experiment, tmp_path: Path
) -> None:
    runs_dir = tmp_path / "runs"
    code, out, err = run_main("run", str(write_experiment()), "--runs-dir", str(runs_dir),
                              "--set", "training.max_steps=2", "--sweep",
                              "model.n_layers,model.d_ff=[1,48],[2,96]")  # fmt: skip
    assert code == 0, err
    assert re.search(r"sweep sweep-\S+: 2 runs of", out)
    models = sorted((read_run(p).experiment["model"] for p in folders(runs_dir)),
                    key=lambda m: m["n_layers"])  # fmt: skip
    assert [(m["n_layers"], m["d_ff"]) for m in models] == [(1, 48), (2, 96)]
    table = out[out.index("RUN_ID") :].splitlines()
    assert table[0].split()[-2:] == ["model.n_layers", "model.d_ff"]
    assert [tuple(row.split()[-2:]) for row in table[1:3]] == [("1", "48"), ("2", "96")]


# -- slmkit runs -------------------------------------------------------------------------


def test_runs_json_matches_the_logs(sweep_runs) -> None:
    code, out, _ = run_main("runs", str(sweep_runs["runs_dir"]), "--json")
    assert code == 0
    records = json.loads(out)
    assert len(records) == 5
    started = [r["started"] for r in records]
    assert started == sorted(started, reverse=True)  # newest first
    for record in records:
        run_dir = Path(record["run_dir"])
        events = read_events(run_dir / "log.jsonl")
        evals = [e for e in events if e["event"] == "eval"]
        start = events[0]
        assert record["run_id"] == start["run_id"] == run_dir.name
        assert record["status"] == "finished"
        assert record["steps"] == record["max_steps"] == start["max_steps"]
        assert record["last_val_loss"] == evals[-1]["val_loss"]
        assert record["last_val_bpc"] == evals[-1]["val_bpc"]
        assert record["best_val_loss"] == min(e["val_loss"] for e in evals)
        assert record["config_hash"] == start["config_hash"]
        assert record["started"] == start["timestamp"]
        assert record["tokens_seen"] == record["steps"] * 4 * 32  # batch x context
        assert record["tokens_per_s"] > 0
    plain = [r for r in records if r["sweep"] is None]
    assert len(plain) == 1 and plain[0]["steps"] == 3


def test_runs_table_has_a_row_per_run(sweep_runs) -> None:
    code, out, _ = run_main("runs", str(sweep_runs["runs_dir"]))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["RUN_ID", "EXPERIMENT", "STATUS", "STEPS", "VAL_LOSS"]
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == 5
    by_id = {row[0]: row for row in rows}
    for run_dir in folders(sweep_runs["runs_dir"]):
        record = read_run(run_dir)
        row = by_id[run_dir.name]
        assert row[1:4] == ["tiny", "finished", f"{record.steps}/{record.max_steps}"]
        assert row[4] == f"{record.last_val_loss:.4f}"
        assert row[8] == record.config_hash[:12]


def test_runs_of_one_sweep(sweep_runs) -> None:
    sweep_id = sweep_runs["sweep_id"]
    code, out, _ = run_main("runs", str(sweep_runs["runs_dir"]), "--sweep", sweep_id)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 5 and lines[0].split()[-1] == "optimizer.learning_rate"
    code, out, _ = run_main("runs", str(sweep_runs["runs_dir"]), "--sweep", "sweep-none")
    assert code == 0 and out.startswith("no runs in")


def test_runs_of_a_missing_folder(tmp_path: Path) -> None:
    code, _, err = run_main("runs", str(tmp_path / "nowhere"))
    assert code == 2
    assert err.strip() == f"slmkit: error: {tmp_path / 'nowhere'}: no such folder of runs"


def copy_run(source: Path, dest_root: Path, name: str) -> Path:
    dest = dest_root / name
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("checkpoints"))
    return dest


def rewrite_log(run_dir: Path, events: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(e) + "\n" for e in events)
    (run_dir / "log.jsonl").write_text(text, encoding="utf-8")


def test_status_running_stopped_failed_from_the_log(sweep_runs, tmp_path: Path) -> None:
    # the sweep's first run, a 6-step run: not whichever folder sorts first by name (the
    # plain 3-step run, when the random suffixes of one second put it first)
    source = sweep_folders(sweep_runs)[-1]
    assert read_run(source).sweep["index"] == 0 and read_run(source).steps == 6
    events = read_events(source / "log.jsonl")
    cut = [e for e in events if e["event"] not in ("run_end",) and e.get("step", 0) <= 4]

    def variant(name: str, first: dict[str, Any], *end: dict[str, Any]) -> Path:
        run_dir = copy_run(source, tmp_path, name)
        rewrite_log(run_dir, [{**cut[0], **first, "run_id": name}, *cut[1:], *end])
        return run_dir

    live = variant("live", {"pid": os.getpid()})  # its process (this one) is alive
    killed = variant("killed", {"pid": 2**22 + 12345})  # no end event, process gone
    failed = variant("failed", {}, {"event": "run_failed", "step": 5, "error": "hook exploded"})
    stopped = variant("stopped", {}, {"event": "run_interrupted", "step": 4, "signal": "SIGTERM"})

    assert (read_run(live).status, read_run(live).steps) == ("running", 4)
    assert read_run(killed).status == "stopped"
    assert (read_run(failed).status, read_run(failed).status_detail) == ("failed", "hook exploded")
    assert read_run(stopped).status_detail == "SIGTERM at step 4"
    code, out, _ = run_main("runs", str(tmp_path))
    assert code == 0
    rows = {line.split()[0]: line.split()[2:4] for line in out.splitlines()[1:]}
    assert rows == {"live": ["running", "4/6"], "killed": ["stopped", "4/6"],
                    "failed": ["failed", "5/6"], "stopped": ["stopped", "4/6"]}  # fmt: skip


def test_newest_is_decided_by_the_start_time_not_by_the_folder_name(tmp_path: Path) -> None:
    # three runs of one second whose random suffixes sort against the order they started
    # in, a sweep whose two runs logged the same microsecond, and a run with no run_start
    starts = {
        "20261201-100000-tiny-ffff": ("2026-12-01T10:00:00.100000Z", None),
        "20261201-100000-tiny-0000": ("2026-12-01T10:00:00.900000Z", None),
        "20261201-100000-tiny-8888": ("2026-12-01T10:00:00Z", None),  # no fraction written
        "20261201-100001-tiny-aaaa": ("2026-12-01T10:00:01.5Z", {"id": "s", "index": 1}),
        "20261201-100001-tiny-bbbb": ("2026-12-01T10:00:01.5Z", {"id": "s", "index": 0}),
    }
    for run_id, (timestamp, sweep) in starts.items():
        (tmp_path / run_id).mkdir()
        rewrite_log(tmp_path / run_id, [{"event": "run_start", "run_id": run_id,
                                         "timestamp": timestamp, "sweep": sweep}])  # fmt: skip
    (tmp_path / "no-start").mkdir()
    rewrite_log(tmp_path / "no-start", [{"event": "train_step", "step": 1, "train_loss": 1.0}])
    order = [r.run_id for r in list_runs(tmp_path)]
    assert order == ["20261201-100001-tiny-aaaa", "20261201-100001-tiny-bbbb",
                     "20261201-100000-tiny-0000", "20261201-100000-tiny-ffff",
                     "20261201-100000-tiny-8888", "no-start"]  # fmt: skip


#: damage done to a copy of a finished run: what to write where, and the detail expected
DAMAGE = {
    "bad-toml": ("experiment.toml", b"[training\nmax_steps = ",
                 "experiment.toml is not valid TOML: "),
    "binary-toml": ("experiment.toml", b"\xff\xfe\x00x",
                    "experiment.toml is not UTF-8 text (bad byte at offset 0)"),
    "no-toml": ("experiment.toml", None, "experiment.toml is missing"),
    "toml-folder": ("experiment.toml", "folder", "experiment.toml cannot be read: Is a directory"),
    "garbage-lines": ("log.jsonl", b"\x00\xff garbage\n[1, 2]\n{\"event\": 5}\n\n",
                      "log.jsonl: 3 line(s) are not JSON events (line "),
    "bad-values": ("log.jsonl", b'{"event": "train_step", "step": "two", "train_loss": 1.0}\n'
                                b'{"event": "eval", "step": 9, "val_loss": "low"}\n',
                   "log.jsonl: malformed eval, train_step event(s)"),
}  # fmt: skip


def renamed_copy(source: Path, root: Path, name: str) -> Path:
    """A copy of a run whose log calls it by its folder's name."""
    run_dir = copy_run(source, root, name)
    log = run_dir / "log.jsonl"
    log.write_bytes(log.read_bytes().replace(source.name.encode(), name.encode()))
    return run_dir


def damage(source: Path, root: Path, name: str) -> Path:
    run_dir = renamed_copy(source, root, name)
    file, content, _ = DAMAGE[name]
    target = run_dir / file
    if file == "log.jsonl":  # garbage after the first event, before the rest
        lines = target.read_bytes().splitlines(keepends=True)
        target.write_bytes(lines[0] + content + b"".join(lines[1:]))
    elif content is None:
        target.unlink()
    elif content == "folder":
        target.unlink()
        target.mkdir()
    else:
        target.write_bytes(content)
    return run_dir


def test_damaged_run_folders_are_shown_as_damaged_and_the_rest_as_usual(
    sweep_runs, tmp_path: Path
) -> None:
    healthy = folders(sweep_runs["runs_dir"])[0]
    renamed_copy(healthy, tmp_path, "good")
    torn = renamed_copy(healthy, tmp_path, "torn")  # a killed run's torn last line is no damage
    with (torn / "log.jsonl").open("ab") as log:
        log.write(b'{"event": "train_st')
    for name in DAMAGE:
        damage(healthy, tmp_path, name)
    expected = read_run(healthy)

    code, out, err = run_main("runs", str(tmp_path), "--json")
    assert (code, err) == (0, "")
    records = {r["run_id"]: r for r in json.loads(out)}
    assert set(records) == {*DAMAGE, "good", "torn"}
    for name, (_, _, detail) in DAMAGE.items():
        assert records[name]["status"] == "damaged", name
        assert records[name]["status_detail"].startswith(detail), name
    for name in ("good", "torn"):
        assert records[name]["status"] == "finished"
        assert records[name]["last_val_loss"] == expected.last_val_loss
    # what could be read is still shown: the losses of a run whose experiment.toml is bad
    assert records["bad-toml"]["last_val_loss"] == expected.last_val_loss
    assert records["garbage-lines"]["steps"] == expected.steps

    code, out, err = run_main("runs", str(tmp_path))
    assert (code, err) == (0, "")
    status = {line.split()[0]: line.split()[2] for line in out.splitlines()[1:]}
    assert status == {**dict.fromkeys(DAMAGE, "damaged"), "good": "finished", "torn": "finished"}

    names = ["good", "bad-toml", "garbage-lines", "no-toml"]
    code, out, err = run_main("compare", *(str(tmp_path / n) for n in names),
                              "--png", str(tmp_path / "curves.png"))  # fmt: skip
    assert code == 0, err
    assert out.startswith("config differences (0 keys):\n(the experiments are identical)")
    metrics = {line.split()[0]: line.split()[1] for line in out.splitlines()
               if line.split() and line.split()[0] in names}  # fmt: skip
    assert metrics == {"good": "finished", "bad-toml": "damaged",
                       "garbage-lines": "damaged", "no-toml": "damaged"}  # fmt: skip
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_run_folder_of_wrong_types_everywhere_is_damaged_not_a_crash(tmp_path: Path) -> None:
    run = tmp_path / "odd"
    run.mkdir()
    (run / "experiment.toml").write_text("training = 5\nexperiment = [1]\n", encoding="utf-8")
    rewrite_log(run, [
        {"event": "run_start", "run_id": 7, "max_steps": "many", "timestamp": 3, "sweep": [1],
         "config_hash": 5, "git_commit": [], "pid": "me", "resumed_from_step": "x"},
        {"event": "train_step", "step": 1, "train_loss": None, "tokens_per_s": "fast"},
        {"event": "eval", "step": 1, "val_loss": 2.0, "val_bpc": "?"},
        {"event": "run_end", "summary": [1]},
    ])  # fmt: skip
    record = read_run(run)
    assert (record.run_id, record.status, record.steps, record.max_steps) == (
        "odd",
        "finished",
        1,
        None,
    )
    assert (record.last_val_loss, record.last_val_bpc, record.tokens_per_s) == (2.0, None, None)
    code, out, err = run_main("runs", str(tmp_path))
    assert (code, err) == (0, "")
    assert out.splitlines()[1].split()[:4] == ["odd", "?", "finished", "1"]


def test_a_resumed_run_keeps_the_resumed_values_of_retrained_steps(tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    run.mkdir()
    (run / "experiment.toml").write_text(tomli_w.dumps(merge(TINY, {})), encoding="utf-8")
    start = {"event": "run_start", "run_id": "resumed", "max_steps": 6, "config_hash": "h",
             "timestamp": "2026-12-01T10:00:00Z"}  # fmt: skip

    def step(n: int, loss: float) -> dict[str, Any]:
        return {"event": "train_step", "step": n, "train_loss": loss, "tokens_per_s": 1.0}

    rewrite_log(run, [
        start, step(1, 5.0), step(2, 4.0), {"event": "eval", "step": 2, "val_loss": 4.5},
        step(3, 9.0),  # killed after step 3, last checkpoint at step 2
        {**start, "resumed_from_step": 2, "timestamp": "2026-12-01T11:00:00Z"},
        step(3, 3.0), step(4, 2.0), {"event": "eval", "step": 4, "val_loss": 2.5},
        {"event": "run_end", "summary": {"steps": 4}},
    ])  # fmt: skip
    record = read_run(run)
    assert record.train_curve.steps == [1, 2, 3, 4]
    assert record.train_curve.values == [5.0, 4.0, 3.0, 2.0]
    assert (record.val_curve.steps, record.val_curve.values) == ([2, 4], [4.5, 2.5])
    assert (record.status, record.steps, record.best_val_loss) == ("finished", 4, 2.5)
    assert record.started == "2026-12-01T10:00:00Z"  # when the run first started


def test_a_resumed_run_shows_the_whole_runs_tokens_per_second(tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    run.mkdir()
    (run / "experiment.toml").write_text(tomli_w.dumps(merge(TINY, {})), encoding="utf-8")

    def at(seconds: int) -> str:
        return f"2026-12-01T10:{seconds // 60:02d}:{seconds % 60:02d}Z"

    start = {"event": "run_start", "run_id": "resumed", "max_steps": 6, "timestamp": at(0)}
    rewrite_log(run, [
        start,
        {"event": "train_step", "step": 2, "train_loss": 4.0, "tokens_per_s": 1.0},
        {"event": "checkpoint", "step": 2, "timestamp": at(10)},
        {"event": "train_step", "step": 3, "train_loss": 9.0, "tokens_per_s": 1.0},  # killed
        {**start, "resumed_from_step": 2, "timestamp": at(100)},  # resumed, killed again
        {**start, "resumed_from_step": 2, "timestamp": at(200)},
        {"event": "checkpoint", "step": 6, "timestamp": at(215)},
        {"event": "run_end", "summary": {"steps": 6, "tokens_per_s": 999.0},
         "timestamp": at(220)},
    ])  # fmt: skip
    # 6 steps of 4 x 32 tokens kept, in 10 s (steps 1-2) + 20 s (steps 3-6); the 90 s of
    # the process that was killed before it saved anything, and step 3 of the first, count
    # for nothing
    record = read_run(run)
    assert record.tokens_per_s == round(6 * 4 * 32 / 30, 1)
    code, out, _ = run_main("runs", str(tmp_path))
    assert code == 0 and out.splitlines()[1].split()[7] == "26"


def test_resuming_with_a_new_max_steps_keeps_the_config_hash(tmp_path: Path) -> None:
    experiment = tmp_path / "tiny.toml"
    experiment.write_text(tomli_w.dumps(merge(TINY, {})), encoding="utf-8")
    runs = tmp_path / "runs"
    code, _, err = run_main("run", str(experiment), "--runs-dir", str(runs),
                            "--set", "training.max_steps=3")  # fmt: skip
    assert code == 0, err
    (short,) = runs.iterdir()
    code, _, err = run_main("run", str(experiment), "--resume", str(short))  # to 6 steps
    assert code == 0, err
    code, _, err = run_main("run", str(experiment), "--runs-dir", str(runs),
                            "--set", "training.threads=1")  # fmt: skip
    assert code == 0, err
    (whole,) = [p for p in runs.iterdir() if p != short]
    hashes = [e["config_hash"] for p in (short, whole) for e in read_events(p / "log.jsonl")
              if e["event"] == "run_start"]  # fmt: skip
    assert len(hashes) == 3 and len(set(hashes)) == 1
    assert read_run(short).config_hash == read_run(whole).config_hash == hashes[0]
    assert (read_run(short).steps, read_run(short).tokens_per_s is not None) == (6, True)
    code, out, _ = run_main("compare", str(short), str(whole))
    assert code == 0
    assert out.splitlines()[:4] == [
        "config differences (1 keys):", f"KEY               {short.name}  {whole.name}",
        "training.threads  0                          1",
        f"(one config_hash, {hashes[0][:12]}: these keys are not part of it)",
    ]  # fmt: skip
    # a run logged before the hash left max_steps out is matched by its experiment.toml
    old = copy_run(whole, tmp_path / "old", "old")
    rewrite_log(old, [{**e, "config_hash": "a-hash-of-every-key"} if e["event"] == "run_start"
                      else e for e in read_events(old / "log.jsonl")])  # fmt: skip
    assert read_run(old).config_hash == hashes[0]
    # what defines the experiment still counts
    other_runs = tmp_path / "other"
    changed = ["--set", "training.max_steps=1", "--set", "model.dropout=0.0"]
    code, _, _ = run_main("run", str(experiment), "--runs-dir", str(other_runs), *changed)
    (other,) = other_runs.iterdir()
    assert code == 0 and read_run(other).config_hash != hashes[0]


# -- slmkit compare ----------------------------------------------------------------------


def sweep_folders(sweep_runs) -> list[Path]:
    return [r.run_dir for r in list_runs(sweep_runs["runs_dir"], sweep=sweep_runs["sweep_id"])]


def test_compare_prints_only_the_differing_keys(sweep_runs) -> None:
    runs = sweep_folders(sweep_runs)[:3]
    code, out, _ = run_main("compare", *map(str, runs))
    assert code == 0
    diff = out[: out.index("environment differences")].splitlines()
    assert diff[0] == "config differences (2 keys):"
    assert diff[1].split() == ["KEY", *(p.name for p in runs)]
    keys = {line.split()[0]: line.split()[1:] for line in diff[2:] if line.strip()}
    expected = {p.name: read_run(p).experiment for p in runs}
    assert keys["model.n_layers"] == [str(expected[p.name]["model"]["n_layers"]) for p in runs]
    assert set(keys) == {"model.n_layers", "optimizer.learning_rate"}
    metrics = out[out.index("metrics:") :].splitlines()
    assert [line.split()[0] for line in metrics[2:5]] == [p.name for p in runs]


def test_compare_by_run_id_and_of_identical_experiments(sweep_runs) -> None:
    run = sweep_folders(sweep_runs)[0]
    code, out, _ = run_main("compare", run.name, str(run), "--runs-dir",
                            str(sweep_runs["runs_dir"]))  # fmt: skip
    assert code == 0 and "(the experiments are identical)" in out
    code, _, err = run_main("compare", "no-such-run", "--runs-dir", str(sweep_runs["runs_dir"]))
    assert code == 2 and "no-such-run: no such run" in err


def test_compare_json_lists_differences_by_run(sweep_runs) -> None:
    runs = sweep_folders(sweep_runs)
    code, out, _ = run_main("compare", "--sweep", sweep_runs["sweep_id"], "--runs-dir",
                            str(sweep_runs["runs_dir"]), "--json")  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert [r["run_id"] for r in data["runs"]] == sorted(
        (p.name for p in runs), key=lambda n: read_run(sweep_runs["runs_dir"] / n).sweep["index"]
    )
    assert sorted(data["differences"]["model.n_layers"].values()) == [1, 1, 2, 2]


def decode_png(data: bytes) -> tuple[int, ...]:
    import matplotlib.image

    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return matplotlib.image.imread(io.BytesIO(data), format="png").shape


def test_report_embeds_a_png_of_the_expected_size_and_every_run(sweep_runs, tmp_path) -> None:
    report, png = tmp_path / "report.html", tmp_path / "curves.png"
    code, out, _ = run_main("compare", "--sweep", sweep_runs["sweep_id"], "--runs-dir",
                            str(sweep_runs["runs_dir"]), "--out", str(report),
                            "--png", str(png))  # fmt: skip
    assert code == 0 and f"wrote {report}" in out
    html = report.read_text(encoding="utf-8")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == 1
    width, height = (int(v * FIGURE_DPI) for v in FIGURE_INCHES)
    assert decode_png(base64.b64decode(embedded[0]))[:2] == (height, width)
    assert base64.b64decode(embedded[0]) == png.read_bytes()
    for run_dir in sweep_folders(sweep_runs):
        record = read_run(run_dir)
        assert record.run_id in html
        assert record.last_sample  # each run's latest sample is shown, escaped
        import html as html_module

        assert html_module.escape(record.last_sample) in html
    assert "<td>model.n_layers</td>" in html
    assert "http://" not in html.replace("http://www.w3.org", "")  # self-contained


def test_report_into_a_missing_folder_writes_nothing(sweep_runs, tmp_path: Path) -> None:
    run = sweep_folders(sweep_runs)[0]
    target = tmp_path / "missing" / "report.html"
    code, _, err = run_main("compare", str(run), "--out", str(target))
    assert code == 2 and "no such folder" in err
    assert not (tmp_path / "missing").exists()


def environment_variant(source: Path, root: Path, name: str,
                        *starts: dict[str, Any]) -> Path:  # fmt: skip
    """A copy of ``source`` whose log is its first process, then more processes (resumes),
    each ``run_start`` changed by one of ``starts``."""
    run_dir = copy_run(source, root, name)
    events = read_events(source / "log.jsonl")
    first, rest = events[0], events[1:]
    log = [{**first, **starts[0], "run_id": name}, *rest]
    for change in starts[1:]:
        log += [{**first, **change, "run_id": name, "resumed_from_step": 6}, rest[-1]]
    rewrite_log(run_dir, log)
    return run_dir


def test_compare_shows_differences_of_the_recorded_environment(sweep_runs, tmp_path) -> None:
    source = sweep_folders(sweep_runs)[-1]
    start = run_start(source)
    a = environment_variant(source, tmp_path, "a", {"num_threads": 2, "git_dirty": False})
    dirty = {"git_dirty": True}  # in both processes of b
    b = environment_variant(source, tmp_path, "b", {"num_threads": 2, **dirty},
                            {"num_threads": 1, "torch_version": "9.9.9", **dirty})  # fmt: skip
    code, out, _ = run_main("compare", str(a), str(b))
    assert code == 0
    text = out[: out.index("metrics:")]
    assert text.startswith("config differences (0 keys):\n(the experiments are identical)\n")
    env = text[text.index("environment differences") :].splitlines()
    assert env[0] == "environment differences (3 keys):"
    assert [line.split() for line in env[1:5]] == [
        ["KEY", "a", "b"],
        ["num_threads", "2", "2", "->", "1"],
        ["torch_version", f'"{start["torch_version"]}"', f'"{start["torch_version"]}"', "->",
         '"9.9.9"'],
        ["git_dirty", "false", "true"],
    ]  # fmt: skip
    code, out, _ = run_main("compare", str(a), str(a))
    assert "(the recorded environments are identical)" in out
    code, out, _ = run_main("compare", str(a), str(b), "--json")
    assert json.loads(out)["environment_differences"]["num_threads"] == {"a": [2], "b": [2, 1]}


EIGHT_KEYS = {
    "model.n_layers": [1, 2, 3, 4], "model.d_model": [32, 64, 96, 128],
    "model.dropout": [0.0, 0.1, 0.2, 0.3], "optimizer.learning_rate": [1e-3, 2e-3, 3e-3, 4e-3],
    "optimizer.betas": [[0.9, 0.95], [0.9, 0.99], [0.8, 0.95], [0.9, 0.9]],
    "training.batch_size": [4, 8, 16, 32], "sampling.every": [3, 4, 5, 6],
    "training.eval_every": [3, 6, 9, 12],
}  # fmt: skip


def eight_key_runs(sweep_runs, root: Path) -> list[Path]:
    """Four copies of a run whose experiments differ in the eight keys above."""
    source = sweep_folders(sweep_runs)[-1]
    runs = []
    for i in range(4):
        run_dir = copy_run(source, root, f"run-{i}")
        experiment = tomllib.loads((source / "experiment.toml").read_text(encoding="utf-8"))
        for key, values in EIGHT_KEYS.items():
            table, name = key.split(".")
            experiment[table][name] = values[i]
        (run_dir / "experiment.toml").write_text(tomli_w.dumps(experiment), encoding="utf-8")
        runs.append(run_dir)
    return runs


def test_the_legend_names_every_differing_key_without_covering_the_plots(
    sweep_runs, tmp_path
) -> None:
    records = [read_run(p) for p in eight_key_runs(sweep_runs, tmp_path)]
    keys = legend_keys(records)
    assert sorted(keys) == sorted(EIGHT_KEYS)
    figure = loss_curves_figure(records)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=FIGURE_DPI)
    (legend,) = figure.legends
    labels = [t.get_text() for t in legend.get_texts()]
    for i, (record, label) in enumerate(zip(records, labels, strict=True)):
        assert label.startswith(record.run_id + "\n")
        assert f"n_layers={i + 1}," in label
        assert f"learning_rate={format_value((i + 1) * 1e-3)}" in label
        assert f"betas={format_value(EIGHT_KEYS['optimizer.betas'][i])}" in label
        assert "sampling.every=" in label and " eval_every=" in label  # "every" alone: which?
        assert label.count("=") == 8 and max(map(len, label.split("\n"))) <= LEGEND_LINE_CHARS
    # the picture grew to hold the legend: below the plots, inside the picture
    width, height = figure_size(labels)
    assert decode_png(png.getvalue())[:2] == (int(height * FIGURE_DPI), int(width * FIGURE_DPI))
    assert height > FIGURE_INCHES[1]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert box.x0 >= 0 and box.y0 >= 0
    assert box.x1 <= width * FIGURE_DPI and box.y1 <= height * FIGURE_DPI
    for axes in figure.axes:
        assert not box.overlaps(axes.get_tightbbox(renderer)), "the legend covers a plot"


def test_without_matplotlib_the_message_names_the_extra(sweep_runs, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    records = [read_run(p) for p in sweep_folders(sweep_runs)]
    with pytest.raises(SlmkitError, match=r"pip install 'slmkit\[plot\]'"):
        loss_curves_png(records)
    assert differing_keys(records) == ["model.n_layers", "optimizer.learning_rate"]


# -- tables and the progress line -----------------------------------------------------------


def test_format_table_aligns_columns_and_can_leave_the_last_free() -> None:
    rows = [["A", "BB", "C"], ["xxx", "y", "a long last cell"]]
    assert format_table(rows) == "A    BB  C\nxxx  y   a long last cell\n"
    assert format_table(rows, wrap_last=True) == "A    BB  C\nxxx  y   a long last cell\n"
    assert format_table([["A", "B"], ["x", "a long one"], ["y", "z"]], wrap_last=True) == (
        "A  B\nx  a long one\ny  z\n"
    )


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_redraws_on_a_terminal() -> None:
    stream = FakeTerminal()
    console = Console(stream)
    console.progress(5, 100, 2.5, 1234.0, 95.0, val_loss=2.75)
    console.progress(6, 100, 2.4, 1300.0, 94.0, val_loss=2.75)
    console.say("step 6: val_loss 2.7")
    text = stream.getvalue()
    assert text.count("\r\x1b[2K") == 2 and text.endswith("\nstep 6: val_loss 2.7\n")
    assert "step 6/100 | loss 2.4000 | val 2.7500 | 1,300 tok/s | ETA 1m34s" in text


def test_progress_degrades_to_periodic_plain_lines_off_a_terminal() -> None:
    stream = io.StringIO()
    console = Console(stream, plain_interval=3600)
    for step in range(1, 11):
        console.progress(step, 10, 3.0, 500.0, 10.0 - step)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "step 1/10 | loss 3.0000 | 500 tok/s | ETA 9s",  # the first at once
        "step 10/10 | loss 3.0000 | 500 tok/s | ETA 0s",  # and the last; nothing between
    ]
    assert "\r" not in stream.getvalue()


def test_listing_and_comparing_runs_never_imports_torch(sweep_runs) -> None:
    # Reading logs must start at once: torch alone takes seconds to import.
    script = (
        "import sys; from slmkit.cli import main; "
        f"assert main(['runs', {str(sweep_runs['runs_dir'])!r}]) == 0; "
        f"assert main(['compare', '--sweep', {sweep_runs['sweep_id']!r}, "
        f"'--runs-dir', {str(sweep_runs['runs_dir'])!r}]) == 0; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
