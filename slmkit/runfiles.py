"""A run folder's files read defensively: whatever is in them, something comes back.

``experiment.toml`` and ``log.jsonl`` are read as far as they can be; what is wrong with
them (missing, unreadable, not TOML, lines that are not events) is appended to a list of
problems instead of raised, and values are taken only when they have the expected type.
:mod:`slmkit.runs` shows a run with problems as ``damaged``.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from slmkit.config.schema import kernel_defaults


def read_experiment(path: Path, problems: list[str]) -> dict[str, Any]:
    """The run's resolved experiment, or ``{}`` (and a problem) when it cannot be read.

    Kernel keys added after the run was written are filled in with what it ran with
    (:func:`slmkit.config.schema.kernel_defaults`), so that an older run compares, groups
    and hashes like a run of today with the same settings.
    """
    try:
        experiment = tomllib.loads(path.read_text(encoding="utf-8"))
        for table, defaults in kernel_defaults().items():
            if isinstance(experiment.get(table), dict):
                experiment[table] = {**defaults, **experiment[table]}
        return experiment
    except FileNotFoundError:
        problems.append("experiment.toml is missing")
    except OSError as exc:
        problems.append(f"experiment.toml cannot be read: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        problems.append(f"experiment.toml is not UTF-8 text (bad byte at offset {exc.start})")
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"experiment.toml is not valid TOML: {exc}")
    return {}


def read_log(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """The events of ``log.jsonl``; lines that are not events become a problem.

    The last line of a killed run may be torn (no newline after it): it is dropped
    silently, as :func:`slmkit.runlog.read_events` does.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"log.jsonl cannot be read: {exc.strerror or exc}")
        return []
    # what follows the last newline is empty, or the torn last line of a killed run
    lines = data.split(b"\n")[:-1]
    events, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line.decode("utf-8"))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            event = None
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            events.append(event)
        else:
            bad.append(number)
    if bad:
        problems.append(
            f"log.jsonl: {len(bad)} line(s) are not JSON events (line {bad[0]}"
            + (", ..." if len(bad) > 1 else "")
            + ")"
        )
    return events


def as_int(value: Any) -> int | None:
    """``value`` if it is an integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_number(value: Any) -> float | None:
    """``value`` as a float if it is a number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def as_text(value: Any) -> str | None:
    """``value`` if it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def as_table(value: Any) -> dict[str, Any]:
    """``value`` if it is a dict, else an empty one."""
    return value if isinstance(value, dict) else {}
