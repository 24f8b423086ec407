"""The experiment schema: one attrs class per table, and the resolved :class:`Experiment`.

Tables that pick a component (``[tokenizer] name``, ``[model] block``, ``[data] corpus``...)
carry that component's own options in ``options`` (structured into the attrs class the
component registered) and the resolved registry entry in ``component``. Arrays of tables
(``[[forward_hooks]]``, ``[[update_hooks]]``, ``[[probes]]``...) live in
:attr:`Experiment.arrays`, keyed by table name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import tomli_w

from slmkit.config.diff import config_hash
from slmkit.config.structure import unstructure_section
from slmkit.options import OptionValueError, boolean, in_range, non_negative, one_of, positive
from slmkit.registry import Component

#: seeds are integers in [0, SEED_LIMIT)
SEED_LIMIT = 2**63


def _below_seed_limit(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value >= SEED_LIMIT:
        raise OptionValueError(attribute.name, f"must be < 2**63, got {value!r}")


def _seed_list(_instance: Any, attribute: attrs.Attribute[Any], value: list[int]) -> None:
    """Every seed a valid ``seed``, none listed twice."""
    for seed in value:
        if not 0 <= seed < SEED_LIMIT:
            raise OptionValueError(attribute.name, f"seeds must be in [0, 2**63), got {seed!r}")
    repeated = sorted({seed for seed in value if value.count(seed) > 1})
    if repeated:
        raise OptionValueError(attribute.name, f"seed {repeated[0]} is listed twice")


@attrs.define(frozen=True)
class ExperimentSection:
    """``[experiment]``: name, seed (or the seeds of replicates) and where run folders go."""

    name: str = "experiment"
    #: below 2**63: what every RNG a run seeds (torch's takes 64 bits) accepts
    seed: int = attrs.field(default=1337, validator=[non_negative, _below_seed_limit])
    #: one run per seed, as a sweep (slmkit.sweep); each run's own experiment has none
    seeds: list[int] = attrs.field(factory=list, validator=_seed_list)
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
    #: a corpus without a floor (see docs/floors.md) is then an error
    require_floor: bool = attrs.field(default=False, validator=boolean)
    options: Any = None
    #: the registered component the name resolved to (filled in by resolution)
    component: Component | None = attrs.field(default=None, eq=False, repr=False)


@attrs.define(frozen=True)
class TokenizerSection:
    """``[tokenizer]``: the tokenizer component and its options."""

    name: str = "char"
    options: Any = None
    #: the registered component the name resolved to (filled in by resolution)
    component: Component | None = attrs.field(default=None, eq=False, repr=False)


#: the values of ``[model] init``: GPT-2's initialisation, or PyTorch's defaults
MODEL_INITS = ("gpt2", "torch")


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
    #: a LayerNorm between the last block and the head
    final_norm: bool = True
    #: "gpt2" (N(0, 0.02), residual projections scaled by depth) or "torch" (its defaults)
    init: str = attrs.field(default="gpt2", validator=one_of(MODEL_INITS))
    options: Any = None
    #: the registered component the name resolved to (filled in by resolution)
    component: Component | None = attrs.field(default=None, eq=False, repr=False)

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
    #: the registered component the name resolved to (filled in by resolution)
    component: Component | None = attrs.field(default=None, eq=False, repr=False)


@attrs.define(frozen=True)
class ScheduleSection:
    """``[schedule]``: the learning-rate schedule component and its options."""

    name: str = "constant"
    options: Any = None
    #: the registered component the name resolved to (filled in by resolution)
    component: Component | None = attrs.field(default=None, eq=False, repr=False)


@attrs.define(frozen=True)
class TrainingSection:
    """``[training]``: the loop's sizes and intervals (0 turns an interval off)."""

    batch_size: int = attrs.field(default=16, validator=positive)
    #: micro-batches per optimizer step: the effective batch is batch_size x this
    grad_accum_steps: int = attrs.field(default=1, validator=positive)
    max_steps: int = attrs.field(default=2000, validator=positive)
    #: a compute budget in FLOPs (0: none); when set it decides max_steps (slmkit/flops.py)
    max_flops: float = attrs.field(default=0.0, validator=non_negative)
    eval_every: int = attrs.field(default=200, validator=non_negative)
    eval_batches: int = attrs.field(default=20, validator=positive)
    checkpoint_every: int = attrs.field(default=200, validator=non_negative)
    keep_checkpoints: int = attrs.field(default=3, validator=positive)
    log_every: int = attrs.field(default=10, validator=positive)
    #: a NaN/Inf loss or gradient: "stop" the run there, or "skip" that step's update
    on_nonfinite: str = attrs.field(default="stop", validator=one_of(("stop", "skip")))
    #: autocast precision of forward passes (fp16 only on CUDA, with a gradient scaler;
    #: "auto": bf16 where the device computes it natively, else fp32; slmkit/precision.py)
    precision: str = attrs.field(default="auto", validator=one_of(("fp32", "bf16", "fp16", "auto")))
    #: torch.compile the model (falls back with a warning where compiling fails)
    compile: bool = False
    device: str = attrs.field(default="auto", validator=one_of(("auto", "cpu", "cuda", "mps")))
    #: torch's CPU threads (0: torch's own count, which follows OMP_NUM_THREADS)
    threads: int = attrs.field(default=0, validator=non_negative)


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
    #: the registered component the name resolved to (filled in by resolution)
    component: Component | None = attrs.field(default=None, eq=False, repr=False)


@attrs.define(frozen=True)
class NamedSection:
    """One table of an array that names its component and gives its options, nothing
    more: an ``[[update_hooks]]`` table (a gradient transform) or a ``[[trackers]]`` table
    (an experiment tracker)."""

    name: str
    enabled: bool = True
    options: Any = None
    #: the registered component the name resolved to (filled in by resolution)
    component: Component | None = attrs.field(default=None, eq=False, repr=False)


@attrs.define(frozen=True)
class ProbeSection:
    """One ``[[probes]]`` table: the probe, how often it runs, the seed of its inputs."""

    name: str
    enabled: bool = True
    #: run at every ``every``-th evaluation (1: each one), and always at the last
    every: int = attrs.field(default=1, validator=positive)
    #: seeds the probe's own generator, which draws its fixed inputs once
    seed: int = attrs.field(default=0, validator=[non_negative, _below_seed_limit])
    options: Any = None
    #: the registered component the name resolved to (filled in by resolution)
    component: Component | None = attrs.field(default=None, eq=False, repr=False)


#: the tables of one section each, in the order experiment files and dumps show them
SECTION_TABLES: tuple[str, ...] = (
    "experiment",
    "plugins",
    "data",
    "tokenizer",
    "model",
    "optimizer",
    "schedule",
    "training",
    "sampling",
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
    #: arrays of tables by name (``forward_hooks``, ``update_hooks``...), in kind order
    arrays: Mapping[str, tuple[Any, ...]] = attrs.field(factory=dict)
    #: the participating plugins, in order (built-ins minus disabled, plus enabled)
    participants: tuple[str, ...] = attrs.field(default=(), eq=False)
    #: where the experiment came from (a file name), for error messages
    source: str = attrs.field(default="<experiment>", eq=False)

    @property
    def forward_hooks(self) -> tuple[ForwardHookSection, ...]:
        """The ``[[forward_hooks]]`` tables, in order."""
        return self.arrays.get("forward_hooks", ())

    @property
    def update_hooks(self) -> tuple[NamedSection, ...]:
        """The ``[[update_hooks]]`` tables, in order."""
        return self.arrays.get("update_hooks", ())

    def to_dict(self) -> dict[str, Any]:
        """The canonical nested dict: kernel keys and component options side by side.

        ``experiment.seeds`` only when it lists seeds: it asks for a sweep, and every run of
        one has its single seed, so run folders never hold it and the ``config_hash`` of a
        run is what it was before the key existed.
        """
        out: dict[str, Any] = {t: unstructure_section(getattr(self, t)) for t in SECTION_TABLES}
        if not self.experiment.seeds:
            del out["experiment"]["seeds"]
        for table, entries in self.arrays.items():
            out[table] = [unstructure_section(entry) for entry in entries]
        return out

    def to_toml(self) -> str:
        """The resolved experiment as TOML (what the run folder's experiment.toml holds).

        The tables, then each entry of ``[[forward_hooks]]``, ``[[probes]]``... as its own
        ``[[...]]`` block, as experiment files are written (tomli_w alone would put short
        entries inline, at the top of the file).
        """
        data = self.to_dict()
        arrays = {table: data.pop(table) for table in self.arrays}
        text = tomli_w.dumps(data)
        for table, entries in arrays.items():
            for entry in entries:  # the entry's own sub-tables follow as [table.key]
                block = tomli_w.dumps({table: entry}).removeprefix(f"[{table}]\n")
                text += f"\n[[{table}]]\n{block}"
        return text

    @property
    def config_hash(self) -> str:
        """What defines the experiment, hashed: every key but ``training.max_steps``,
        ``training.max_flops`` and ``training.threads`` (:func:`slmkit.config.diff.config_hash`)."""
        return config_hash(self.to_dict())


#: keys whose default changed after they were added: what their absence in an older run
#: folder's experiment.toml means (the default they were added with)
ABSENT_MEANS: dict[tuple[str, str], Any] = {("training", "precision"): "fp32"}


def kernel_defaults() -> dict[str, dict[str, Any]]:
    """Each single table's kernel keys, with what a run folder lacking one ran with.

    What a run folder's ``experiment.toml`` written before a key existed means by its
    absence: a key is added with the default that keeps what runs did before it (or, when
    that default changed since, the one in :data:`ABSENT_MEANS`). Components' options are
    left out, and ``experiment.seeds``: run folders never hold it (see ``to_dict``).
    """
    hints = attrs.resolve_types(Experiment)
    out: dict[str, dict[str, Any]] = {}
    for table in SECTION_TABLES:
        section: Any = attrs.fields_dict(hints)[table].type
        defaults = {}
        for field in attrs.fields(section):
            if field.name in ("options", "component", "seeds"):
                continue
            default = field.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = default.factory()
            default = ABSENT_MEANS.get((table, field.name), default)
            if default is not attrs.NOTHING:
                defaults[field.name] = default
        out[table] = defaults
    return out
