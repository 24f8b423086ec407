"""The run log: structlog JSON lines in ``runs/<run_id>/log.jsonl``, and run metadata.

Every line is one event: structlog's ``event`` key names it, ``timestamp`` is ISO-8601 UTC,
and ``run_id`` is bound to every line. The file is line-buffered, so a killed run leaves
every event it logged.

A log may hand each line it wrote to a sink, parsed back: the run's trackers
(:mod:`slmkit.trackers`), which so see exactly what ``log.jsonl`` holds.

Every line is strict JSON: a NaN or infinite float (a diverged loss, an overflowing
gradient norm) is written as ``null``, and the event's ``nonfinite`` field maps the dotted
path of each such value to ``"nan"``, ``"inf"`` or ``"-inf"``.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import structlog

from slmkit.errors import RunError

if TYPE_CHECKING:  # reading logs (`slmkit runs`, `compare`) must not wait for torch
    import torch


class LogSink(Protocol):
    """What a log hands each event it wrote to (the run's trackers)."""

    def feed(self, event: dict[str, Any], log: RunLog) -> None:
        """Take ``event``, just written to ``log``."""

    def close(self) -> None:
        """The log closes."""


class _LineWriter(structlog.WriteLogger):
    """structlog's file logger, handing each line, once written, to ``written``."""

    def __init__(self, file: TextIO, written: Any) -> None:
        super().__init__(file)
        self._written = written

    def msg(self, message: str) -> None:
        """Write the line (flushed), then hand it on."""
        super().msg(message)
        self._written(message)

    log = debug = info = warn = warning = msg


class RunLog:
    """Appends events to a run's ``log.jsonl`` (and hands each to ``sink``)."""

    def __init__(self, path: Path, run_id: str, sink: LogSink | None = None) -> None:
        self.path = path
        self.sink = sink
        self._file: TextIO = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._logger = structlog.wrap_logger(
            _LineWriter(self._file, self._written),
            processors=[
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
                finite_fields,
                # allow_nan=False: a non-finite value that got past finite_fields fails here
                # loudly rather than writing a line strict JSON parsers reject
                structlog.processors.JSONRenderer(default=str, allow_nan=False),
            ],
        ).bind(run_id=run_id)

    @classmethod
    def open(cls, path: Path, run_id: str, sink: LogSink | None = None) -> RunLog:
        """The log of a run; one that cannot be opened for appending is a one-line error."""
        try:
            return cls(path, run_id, sink)
        except OSError as exc:
            raise RunError(f"cannot write the run log {path}: {exc.strerror or exc}") from None

    def event(self, event: str, /, **fields: Any) -> None:
        """Write one event line (fields may include ``name``; not ``event``)."""
        self._logger.info(event, **fields)

    def _written(self, line: str) -> None:
        if self.sink:  # the sink of a run without trackers is empty
            self.sink.feed(json.loads(line), self)

    def close(self) -> None:
        """Close the sink (which may still log), then the file."""
        if self.sink is not None:
            self.sink.close()
        self._file.close()


def finite_fields(_logger: Any, _method: str, fields: MutableMapping[str, Any]) -> dict[str, Any]:
    """The event with NaN and infinite floats as ``None``, listed in ``nonfinite``.

    (A structlog processor: JSON has no NaN or Infinity, and parsers other than Python's
    reject the tokens ``json.dumps`` writes for them by default.)
    """
    found: dict[str, str] = {}
    cleaned = {key: _finite(value, key, found) for key, value in fields.items()}
    if found:
        cleaned["nonfinite"] = found
    return cleaned


def _finite(value: Any, path: str, found: dict[str, str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found[path] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{path}.{k}", found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v, f"{path}.{i}", found) for i, v in enumerate(value)]
    return value


class NullLog:
    """A run log that writes nothing: what ranks other than 0 hold under torchrun."""

    path = None

    def event(self, event: str, /, **fields: Any) -> None:
        """Drop the event (rank 0 logs for the whole run)."""

    def close(self) -> None:
        """Nothing to close."""


def read_events(path: Path) -> list[dict[str, Any]]:
    """Parse a ``log.jsonl`` (skipping a torn last line of a killed run)."""
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def git_state(cwd: Path) -> dict[str, Any]:
    """The commit of the repository holding ``cwd`` and whether it has local changes."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status)}


def environment(device: torch.device) -> dict[str, Any]:
    """What a bit-exact rerun depends on: versions, device, threads, CPU capability."""
    import torch

    env: dict[str, Any] = {
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "platform": sys.platform,
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda_version"] = torch.version.cuda
    return env
