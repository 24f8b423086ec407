"""Strict structuring: TOML values -> attrs classes, never coerced, the first error named.

``3.9`` is no integer and ``"4"`` no number: every value must already have its type. An
error is reported once, for the first bad key, as ``file: dotted.key: message``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import cattrs
from cattrs.cols import list_structure_factory
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from slmkit.errors import ConfigError
from slmkit.options import OptionValueError


def type_name(value: Any) -> str:
    """The TOML name of a value's type, for messages."""
    return {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(value), type(value).__name__)


def _strict_int(value: Any, _type: type) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type_name(value)} {value!r}")
    return value


def _strict_float(value: Any, _type: type) -> float:
    if type(value) not in (int, float):
        raise TypeError(f"expected a number, got {type_name(value)} {value!r}")
    return float(value)


def _strict_str(value: Any, _type: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type_name(value)} {value!r}")
    return value


def _strict_bool(value: Any, _type: type) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected true or false, got {type_name(value)} {value!r}")
    return value


def make_converter() -> cattrs.Converter:
    """The converter used for every table and every component's options."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook(float, _strict_float)
    converter.register_structure_hook(str, _strict_str)
    converter.register_structure_hook(bool, _strict_bool)

    def is_list(t: Any) -> bool:
        return getattr(t, "__origin__", None) is list

    def strict_list_factory(t: Any, conv: cattrs.Converter) -> Any:
        structure_items = list_structure_factory(t, conv)

        def strict_list(value: Any, _t: Any) -> list[Any]:
            if not isinstance(value, list):
                raise TypeError(f"expected an array, got {type_name(value)} {value!r}")
            return structure_items(value, _t)

        return strict_list

    converter.register_structure_hook_factory(is_list, strict_list_factory)
    return converter


CONVERTER = make_converter()


def _first_error(exc: BaseException, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str]:
    """The dotted path and message of the first leaf error inside a cattrs error group."""
    if isinstance(exc, ClassValidationError | IterableValidationError):
        for sub in exc.exceptions:
            notes = getattr(sub, "__notes__", [])
            step: tuple[str, ...] = ()
            for note in notes:
                if hasattr(note, "name"):
                    step = (note.name,)
                elif hasattr(note, "index"):
                    step = (str(note.index),)
            return _first_error(sub, path + step)
    if isinstance(exc, OptionValueError):
        return (*path, exc.key), exc.message
    if isinstance(exc, ForbiddenExtraKeysError):
        fields = [f.name for f in attrs.fields(exc.cl)]
        key = sorted(exc.extra_fields)[0]
        return (*path, key), unknown_key_message(key, fields)
    if isinstance(exc, KeyError):
        return (*path, str(exc.args[0])), "required key is missing"
    return path, str(exc)


def unknown_key_message(key: str, known: Iterable[str]) -> str:
    """``unknown key (did you mean 'x'?); expected one of: ...``."""
    known = list(known)
    hint = difflib.get_close_matches(key, known, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown key{suggestion}; expected one of: {', '.join(known)}"


def structure(data: Mapping[str, Any], cls: type, source: str, prefix: str) -> Any:
    """Structure ``data`` into the attrs class ``cls``; errors name ``source`` and the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, prefix, f"expected a table, got {type_name(data)}")
    try:
        return CONVERTER.structure(dict(data), cls)
    except (ClassValidationError, OptionValueError, TypeError, ValueError) as exc:
        path, message = _first_error(exc)
        raise ConfigError(source, ".".join(p for p in (prefix, *path) if p), message) from None


def unstructure_section(section: Any) -> dict[str, Any]:
    """A table as a plain dict: kernel keys, then the component's options beside them.

    ``component`` (the resolved registry entry) is bookkeeping, not configuration.
    """
    out: dict[str, Any] = {}
    for field in attrs.fields(type(section)):
        value = getattr(section, field.name)
        if field.name == "options":
            out.update(CONVERTER.unstructure(value) if value is not None else {})
        elif field.name != "component":
            out[field.name] = CONVERTER.unstructure(value)
    return out
