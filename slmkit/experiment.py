"""Experiment files: TOML -> validated attrs classes, overrides, canonical dump and hash.

An experiment is a TOML file of tables (``[model]``, ``[training]``...). Tables that pick a
component (``[tokenizer] name``, ``[model] block``, ``[data] corpus``...) also carry that
component's own options, structured into the attrs class the component registered. Every
error names the file and the dotted key: ``experiments/x.toml: model.n_heads: ...``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs
import tomli_w
from cattrs.cols import list_structure_factory
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from slmkit.errors import ConfigError, SlmkitError
from slmkit.options import OptionValueError, in_range, non_negative, one_of, positive
from slmkit.plugins import PluginManager

# ---------------------------------------------------------------------------------------
# The kernel's tables. Component tables keep their component's options in ``options``.
# ---------------------------------------------------------------------------------------


@attrs.define(frozen=True)
class ExperimentSection:
    """``[experiment]``: name, seed and where run folders go."""

    name: str = "experiment"
    seed: int = attrs.field(default=1337, validator=non_negative)
    runs_dir: str = "runs"


@attrs.define(frozen=True)
class PluginsSection:
    """``[plugins]``: third-party distributions taking part, built-ins left out."""

    enable: list[str] = attrs.Factory(list)
    disable: list[str] = attrs.Factory(list)


@attrs.define(frozen=True)
class DataSection:
    """``[data]``: the corpus component (its options are the other keys) and the split."""

    corpus: str = "python_docs"
    val_fraction: float = attrs.field(
        default=0.05, validator=in_range(0, 1, low_open=True, high_open=True)
    )
    options: Any = None


@attrs.define(frozen=True)
class TokenizerSection:
    """``[tokenizer]``: the tokenizer component and its options."""

    name: str = "char"
    options: Any = None


@attrs.define(frozen=True)
class ModelSection:
    """``[model]``: model-wide sizes, the block component and its options."""

    block: str = "gpt"
    n_layers: int = attrs.field(default=4, validator=positive)
    d_model: int = attrs.field(default=256, validator=positive)
    n_heads: int = attrs.field(default=4, validator=positive)
    d_ff: int = attrs.field(default=1024, validator=positive)
    dropout: float = attrs.field(default=0.1, validator=in_range(0, 1, high_open=True))
    context_length: int = attrs.field(default=256, validator=positive)
    #: share the token embedding matrix with the output head
    tie_embeddings: bool = False
    options: Any = None

    def __attrs_post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise OptionValueError(
                "n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}"
            )


@attrs.define(frozen=True)
class OptimizerSection:
    """``[optimizer]``: the optimizer component, the base learning rate, and its options."""

    name: str = "adamw"
    learning_rate: float = attrs.field(default=3e-4, validator=positive)
    options: Any = None


@attrs.define(frozen=True)
class ScheduleSection:
    """``[schedule]``: the learning-rate schedule component and its options."""

    name: str = "constant"
    options: Any = None


@attrs.define(frozen=True)
class TrainingSection:
    """``[training]``: the loop's sizes and intervals (0 turns an interval off)."""

    batch_size: int = attrs.field(default=16, validator=positive)
    #: micro-batches per optimizer step: the effective batch is batch_size x this
    grad_accum_steps: int = attrs.field(default=1, validator=positive)
    max_steps: int = attrs.field(default=2000, validator=positive)
    eval_every: int = attrs.field(default=200, validator=non_negative)
    eval_batches: int = attrs.field(default=20, validator=positive)
    checkpoint_every: int = attrs.field(default=200, validator=non_negative)
    keep_checkpoints: int = attrs.field(default=3, validator=positive)
    log_every: int = attrs.field(default=10, validator=positive)
    #: a NaN/Inf loss or gradient: "stop" the run there, or "skip" that step's update
    on_nonfinite: str = attrs.field(default="stop", validator=one_of(("stop", "skip")))
    #: autocast precision of forward passes (fp16 only on CUDA, with a gradient scaler)
    precision: str = attrs.field(default="fp32", validator=one_of(("fp32", "bf16", "fp16")))
    #: torch.compile the model (falls back with a warning where compiling fails)
    compile: bool = False
    device: str = attrs.field(default="auto", validator=one_of(("auto", "cpu", "cuda", "mps")))


@attrs.define(frozen=True)
class SamplingSection:
    """``[sampling]``: periodic samples during training (``every = 0``: none)."""

    every: int = attrs.field(default=200, validator=non_negative)
    max_new_tokens: int = attrs.field(default=200, validator=positive)
    temperature: float = attrs.field(default=1.0, validator=positive)
    #: sample only among the k most likely tokens (0: no limit)
    top_k: int = attrs.field(default=0, validator=non_negative)
    #: nucleus sampling: the most likely tokens covering this probability (1.0: no limit)
    top_p: float = attrs.field(default=1.0, validator=in_range(0, 1, low_open=True))
    prompt: str = "\n"


@attrs.define(frozen=True)
class ForwardHookSection:
    """One ``[[forward_hooks]]`` table: the hook, where it looks, how often, its options."""

    name: str
    enabled: bool = True
    #: globs of hook points to watch; empty: the hook's own default points
    points: list[str] = attrs.Factory(list)
    every: int = attrs.field(default=1, validator=positive)
    options: Any = None


@attrs.define(frozen=True)
class UpdateHookSection:
    """One ``[[update_hooks]]`` table: the gradient transform and its options."""

    name: str
    enabled: bool = True
    options: Any = None


#: table -> (section class, the key that names its component, the component kind)
_COMPONENT_TABLES: dict[str, tuple[type, str, str]] = {
    "data": (DataSection, "corpus", "corpus"),
    "tokenizer": (TokenizerSection, "name", "tokenizer"),
    "model": (ModelSection, "block", "block"),
    "optimizer": (OptimizerSection, "name", "optimizer"),
    "schedule": (ScheduleSection, "name", "schedule"),
}
_PLAIN_TABLES: dict[str, type] = {
    "experiment": ExperimentSection,
    "plugins": PluginsSection,
    "training": TrainingSection,
    "sampling": SamplingSection,
}
_HOOK_TABLES: dict[str, tuple[type, str]] = {
    "forward_hooks": (ForwardHookSection, "forward_hook"),
    "update_hooks": (UpdateHookSection, "update_hook"),
}
TABLES: tuple[str, ...] = (
    "experiment",
    "plugins",
    "data",
    "tokenizer",
    "model",
    "optimizer",
    "schedule",
    "training",
    "sampling",
    "forward_hooks",
    "update_hooks",
)


@attrs.define(frozen=True)
class Experiment:
    """A resolved experiment: every table with defaults filled in and options structured."""

    experiment: ExperimentSection
    plugins: PluginsSection
    data: DataSection
    tokenizer: TokenizerSection
    model: ModelSection
    optimizer: OptimizerSection
    schedule: ScheduleSection
    training: TrainingSection
    sampling: SamplingSection
    forward_hooks: tuple[ForwardHookSection, ...] = ()
    update_hooks: tuple[UpdateHookSection, ...] = ()
    #: the participating plugins, in order (built-ins minus disabled, plus enabled)
    participants: tuple[str, ...] = attrs.field(default=(), eq=False)
    #: where the experiment came from (a file name), for error messages
    source: str = attrs.field(default="<experiment>", eq=False)

    def to_dict(self) -> dict[str, Any]:
        """The canonical nested dict: kernel keys and component options side by side."""
        out: dict[str, Any] = {}
        for table in TABLES:
            value = getattr(self, table)
            if isinstance(value, tuple):
                out[table] = [_section_to_dict(v) for v in value]
            else:
                out[table] = _section_to_dict(value)
        return out

    def to_toml(self) -> str:
        """The resolved experiment as TOML (what the run folder's experiment.toml holds)."""
        data = self.to_dict()
        for table in _HOOK_TABLES:
            if not data[table]:
                del data[table]
        return tomli_w.dumps(data)

    @property
    def config_hash(self) -> str:
        """sha256 of the canonical resolved experiment (sorted JSON)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Strict structuring: TOML values are never coerced (3.9 is no int, "4" is no number).
# ---------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
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
        raise TypeError(f"expected an integer, got {_type_name(value)} {value!r}")
    return value


def _strict_float(value: Any, _type: type) -> float:
    if type(value) not in (int, float):
        raise TypeError(f"expected a number, got {_type_name(value)} {value!r}")
    return float(value)


def _strict_str(value: Any, _type: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_type_name(value)} {value!r}")
    return value


def _strict_bool(value: Any, _type: type) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected true or false, got {_type_name(value)} {value!r}")
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
                raise TypeError(f"expected an array, got {_type_name(value)} {value!r}")
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
        return (*path, key), _unknown_key_message(key, fields)
    if isinstance(exc, KeyError):
        return (*path, str(exc.args[0])), "required key is missing"
    return path, str(exc)


def _unknown_key_message(key: str, known: Iterable[str]) -> str:
    known = list(known)
    hint = difflib.get_close_matches(key, known, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown key{suggestion}; expected one of: {', '.join(known)}"


def structure(data: Mapping[str, Any], cls: type, source: str, prefix: str) -> Any:
    """Structure ``data`` into the attrs class ``cls``; errors name ``source`` and the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, prefix, f"expected a table, got {_type_name(data)}")
    try:
        return CONVERTER.structure(dict(data), cls)
    except (ClassValidationError, OptionValueError, TypeError, ValueError) as exc:
        path, message = _first_error(exc)
        raise ConfigError(source, ".".join(p for p in (prefix, *path) if p), message) from None


def _section_to_dict(section: Any) -> dict[str, Any]:
    out = {}
    for field in attrs.fields(type(section)):
        value = getattr(section, field.name)
        if field.name == "options":
            out.update(CONVERTER.unstructure(value) if value is not None else {})
        else:
            out[field.name] = CONVERTER.unstructure(value)
    return out


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


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


def load_experiment(
    path: str | Path, manager: PluginManager, overrides: Sequence[str] = ()
) -> Experiment:
    """Read, override, validate and resolve an experiment file."""
    path = Path(path)
    data = apply_overrides(read_toml(path), overrides)
    return experiment_from_dict(data, manager, source=str(path))


def experiment_from_dict(
    data: Mapping[str, Any], manager: PluginManager, source: str
) -> Experiment:
    """Validate and resolve a parsed experiment; ``source`` names it in errors."""
    for table in data:
        if table not in TABLES:
            raise ConfigError(
                source,
                table,
                _unknown_key_message(table, TABLES).replace("unknown key", "unknown table"),
            )

    sections: dict[str, Any] = {}
    for table, cls in _PLAIN_TABLES.items():
        sections[table] = structure(data.get(table, {}), cls, source, table)

    plugins = sections["plugins"]
    try:
        participants = manager.participants(plugins.enable, plugins.disable)
    except SlmkitError as exc:
        raise ConfigError(source, None, str(exc)) from None  # the message names the key

    for table, (cls, name_key, kind) in _COMPONENT_TABLES.items():
        sections[table] = _component_section(
            data.get(table, {}), cls, name_key, kind, manager, participants, source, table
        )
    for table, (cls, kind) in _HOOK_TABLES.items():
        entries = data.get(table, [])
        if not isinstance(entries, list):
            raise ConfigError(source, table, f"expected an array of tables ([[{table}]])")
        sections[table] = tuple(
            _component_section(
                entry, cls, "name", kind, manager, participants, source, f"{table}.{i}"
            )
            for i, entry in enumerate(entries)
        )
    return Experiment(**sections, participants=tuple(participants), source=source)


def _component_section(
    table: Any,
    cls: type,
    name_key: str,
    kind: str,
    manager: PluginManager,
    participants: Sequence[str],
    source: str,
    prefix: str,
) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(source, prefix, f"expected a table, got {_type_name(table)}")
    kernel_keys = [f.name for f in attrs.fields(cls) if f.name != "options"]
    name_field = attrs.fields_dict(cls)[name_key]
    name = table.get(name_key, name_field.default)
    if name is attrs.NOTHING:
        raise ConfigError(source, f"{prefix}.{name_key}", "required key is missing")
    if not isinstance(name, str):
        raise ConfigError(source, f"{prefix}.{name_key}", f"expected a string, got {name!r}")
    try:
        component = manager.component(kind, name, participants)
    except SlmkitError as exc:
        raise ConfigError(source, f"{prefix}.{name_key}", str(exc)) from None
    option_keys = [f.name for f in attrs.fields(component.options)]
    for key in table:
        if key not in kernel_keys and key not in option_keys:
            known = kernel_keys + option_keys
            raise ConfigError(source, f"{prefix}.{key}", _unknown_key_message(key, known))
    options = structure(
        {k: v for k, v in table.items() if k in option_keys}, component.options, source, prefix
    )
    kernel = {k: v for k, v in table.items() if k in kernel_keys}
    section = structure(kernel, cls, source, prefix)
    return attrs.evolve(section, options=options)


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two experiment dicts."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return sorted(
        k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k)
    )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list) and data and all(isinstance(v, Mapping) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}
