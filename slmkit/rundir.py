"""The run folder: its name, the files written when it opens, and atomic writes.

    runs/<run_id>/            run_id = <UTC time>-<experiment name>-<4 hex digits>
        experiment.toml       the resolved experiment
        tokenizer.json        the tokenizer's name and state
        log.jsonl             the events (slmkit.runlog)
        checkpoints/          step_<N>.pt and latest.pt (slmkit.checkpoint)
        console.log           what the run printed, when a sweep ran it as a child process
                              (``--jobs``, slmkit.sweep_jobs); appended line by line

Every file slmkit writes whole (the logs grow line by line) goes through
:func:`atomic_file`: a crash leaves the old file or the new one, never half of one, and at
worst a temporary ``.<name>.<pid>.tmp`` beside it, which :func:`remove_orphaned_temps`
deletes when a run next opens the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from slmkit.errors import ConfigError, RunError
from slmkit.floor import FLOOR_FILE, Floor

#: a run's console output, kept when a sweep runs it as a child process
CONSOLE_LOG = "console.log"


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A binary file to write that replaces ``path`` only once it is complete on disk.

    It is a temporary file in the same folder, flushed and fsynced, then renamed over
    ``path`` (rename is atomic within one file system). On any error the temporary file
    is removed and ``path`` is untouched.
    """
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def temp_path(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it: ``.<name>.<pid>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


#: the names :func:`temp_path` gives, with the writer's process id
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def remove_orphaned_temps(run_dir: Path) -> list[Path]:
    """Delete the temporary files in ``run_dir`` that no live process is writing; return them.

    A write killed before its rename leaves its temporary file behind. One named by this
    process's id is orphaned too: this process has written nothing here yet (a killed run's
    id may come back, as it often does in containers).
    """
    removed = []
    for path in sorted(run_dir.rglob(".*.tmp")):
        match = _TEMP_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and process_alive(pid):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk, where the platform allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported everywhere (e.g. Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_run_id(name: str) -> str:
    """``<UTC time>-<experiment name>-<4 hex digits>``: unique enough, readable.

    The time is to the second, so names do not order runs of one second: what is newest
    is decided by the logged start time (:func:`slmkit.runs.newest_first`), never by name.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{slug}-{secrets.token_hex(2)}"


def create_run_dir(runs_dir: Path, name: str) -> tuple[str, Path]:
    """A fresh folder under ``runs_dir`` and its run id.

    A taken name (same second, same random digits) is drawn again rather than reused.
    """
    for _ in range(8):
        run_id = new_run_id(name)
        run_dir = runs_dir / run_id
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        except OSError as exc:
            raise RunError(f"cannot create the run folder {run_dir}: {exc}") from None
        return run_id, run_dir
    raise RunError(f"cannot find a free run folder name in {runs_dir}")


def runs_folder(option: str | Path | None, runs_dir: str) -> Path:
    """Where run folders go: ``--runs-dir`` when given (``""`` is the current folder), else
    the experiment's ``experiment.runs_dir``."""
    return Path(runs_dir if option is None else option)


def check_runs_folder(option: str | None, runs_dir: str, source: str) -> None:
    """Refuse, in one line naming where it was set, a runs folder that cannot hold runs:
    the nearest part of its path that exists must be a folder this process may write in.

    ``option`` is ``--runs-dir`` when given (it wins), ``runs_dir`` the experiment's
    ``experiment.runs_dir`` and ``source`` its file. Nothing is made.
    """
    existing = runs_folder(option, runs_dir)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is a folder this user may not write in"
    else:
        return
    message = f"{problem}; runs cannot be kept"
    if option is not None:
        raise ConfigError("--runs-dir", None, message)
    raise ConfigError(source, "experiment.runs_dir", message)


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a run folder: experiment.toml and log.jsonl beside checkpoints/."""
    return (
        (folder / "experiment.toml").is_file()
        and (folder / "log.jsonl").is_file()
        and (folder / "checkpoints").is_dir()
    )


def write_run_files(
    run_dir: Path, experiment_toml: str, tokenizer: dict[str, Any], floor: Floor | None = None
) -> list[Path]:
    """What a run folder holds from its start: the experiment, the tokenizer, checkpoints/,
    and ``floor.json`` when the corpus has a floor (a resume rewrites the same values).

    Removes orphaned temporary files first (returns them). A folder that cannot be written
    (read-only, no space) is a one-line :class:`RunError`; nothing in it is lost.
    """
    try:
        removed = remove_orphaned_temps(run_dir)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        write_atomic(run_dir / "experiment.toml", experiment_toml)
        write_atomic(run_dir / "tokenizer.json", json.dumps(tokenizer, indent=1) + "\n")
        if floor is not None:
            write_atomic(run_dir / FLOOR_FILE, json.dumps(floor.as_json(), indent=1) + "\n")
    except OSError as exc:
        raise RunError(f"cannot write to the run folder {run_dir}: {exc.strerror or exc}") from None
    return removed
