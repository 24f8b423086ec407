"""The component kinds, declared once: hook, experiment table, naming key, factory type.

A kind is everything the kernel knows about one sort of plugin component: the
registration hook plugins implement to provide it (a spec in :mod:`slmkit.hookspecs`),
the experiment table that picks it and the key that names it there, the attrs class of
that table's kernel keys, and the factory type its providers register. Adding a kind is
one entry here plus its hookspec; the plugin manager, ``slmkit plugins`` and experiment
resolution all read this table.
"""

from __future__ import annotations

import attrs

from slmkit import components, tracking
from slmkit.config import schema


@attrs.define(frozen=True)
class Kind:
    """One kind of component."""

    #: the kind's name, as ``slmkit plugins`` shows it (``"block"``)
    name: str
    #: the registration hook that provides components of this kind
    hook: str
    #: the experiment table that picks one (or, when ``many``, an array of such tables)
    table: str
    #: the key of that table naming the component (``[model] block = "gpt"``)
    name_key: str
    #: the attrs class of the table's kernel keys; it has ``options`` and ``component``
    section: type
    #: the factory type providers register (a ``typing.Protocol``, for readers and checkers)
    factory: type
    #: an array of tables (``[[forward_hooks]]``): any number of them, in order
    many: bool = False
    #: with ``many``: each component enabled once at most (a run feeds a tracker once)
    once_each: bool = False


KINDS: tuple[Kind, ...] = (
    Kind("tokenizer", "register_tokenizers", "tokenizer", "name",
         schema.TokenizerSection, components.TokenizerFactory),
    Kind("block", "register_blocks", "model", "block",
         schema.ModelSection, components.BlockFactory),
    Kind("optimizer", "register_optimizers", "optimizer", "name",
         schema.OptimizerSection, components.OptimizerFactory),
    Kind("schedule", "register_schedules", "schedule", "name",
         schema.ScheduleSection, components.ScheduleFactory),
    Kind("corpus", "register_corpora", "data", "corpus",
         schema.DataSection, components.CorpusFactory),
    Kind("forward_hook", "register_forward_hooks", "forward_hooks", "name",
         schema.ForwardHookSection, components.ForwardHookFactory, many=True),
    Kind("update_hook", "register_update_hooks", "update_hooks", "name",
         schema.NamedSection, components.UpdateHookFactory, many=True),
    Kind("probe", "register_probes", "probes", "name",
         schema.ProbeSection, components.ProbeFactory, many=True),
    Kind("tracker", "register_trackers", "trackers", "name",
         schema.NamedSection, tracking.TrackerFactory, many=True, once_each=True),
)  # fmt: skip
