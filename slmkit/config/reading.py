"""Reading experiment files, and ``--set KEY=VALUE`` overrides in TOML syntax."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slmkit.errors import ConfigError


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; syntax errors name the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), None, "no such experiment file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), None, f"invalid TOML: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.n_layers=6"`` -> (["model", "n_layers"], 6); values use TOML syntax.

    A value that is not valid TOML is taken as a string, so paths need no quotes.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 on the command line
        raise ConfigError(
            "--set", key or None, f"{text!r} is not valid UTF-8 text (check the terminal)"
        ) from None
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            "--set", text, "expected KEY=VALUE with a dotted key, e.g. model.n_layers=6"
        )
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a parsed experiment (a new dict is returned)."""
    result = json.loads(json.dumps(data))  # deep copy of plain TOML values
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = result
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError("--set", ".".join(parts[: i + 1]), "no such array entry")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ConfigError("--set", ".".join(parts[: i + 1]), "is not a table")
        if isinstance(node, list):
            raise ConfigError("--set", text, "cannot replace a whole array entry")
        node[parts[-1]] = value
    return result
