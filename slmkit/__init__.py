"""slmkit: small language models from first principles, built from plugins.

This module is the plugin API: everything a plugin (built-in or third-party) may use is
exported here, and nothing else in ``slmkit.*`` is promised to stay put. Plugins write
``import slmkit`` and use ``slmkit.hookimpl``, ``slmkit.HookPoint``, ``slmkit.positive``...

Names that need torch are imported on first use, so commands that only read logs
(``slmkit runs``, ``slmkit compare``) start without it. A plugin's *tests* may also use
``slmkit.testing`` (tiny models and runs, the KV-cache check); nothing else is public.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from slmkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    PluginError,
    RunError,
    SlmkitError,
)
from slmkit.floor import Floor
from slmkit.hookspecs import hookimpl
from slmkit.options import (
    NoOptions,
    OptionValueError,
    boolean,
    in_range,
    non_negative,
    one_of,
    positive,
    two_betas,
)
from slmkit.param_groups import parameter_layer, weight_decay_groups
from slmkit.tracking import (
    TrackedRun,
    TrackedValues,
    Tracker,
    TrackerFactory,
    tracked_values,
)

if TYPE_CHECKING:
    from slmkit.blocks import causal_mask, init_gpt2_weights
    from slmkit.components import (
        Block,
        BlockContext,
        BlockFactory,
        Corpus,
        CorpusFactory,
        ForwardHook,
        ForwardHookFactory,
        KVCache,
        ModelDims,
        OptimizerFactory,
        Probe,
        ProbeContext,
        ProbeFactory,
        ProbeSetup,
        Register,
        Schedule,
        ScheduleFactory,
        Tokenizer,
        TokenizerFactory,
        UpdateHook,
        UpdateHookFactory,
    )
    from slmkit.dropout_mask import Dropout, dropout
    from slmkit.hookpoint import HookPoint
    from slmkit.run import Run

try:
    __version__ = version("slmkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

#: the names that import torch, and the module each lives in (loaded on first use)
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        (
            "Block",
            "BlockContext",
            "BlockFactory",
            "Corpus",
            "CorpusFactory",
            "ForwardHook",
            "ForwardHookFactory",
            "KVCache",
            "ModelDims",
            "OptimizerFactory",
            "Probe",
            "ProbeContext",
            "ProbeFactory",
            "ProbeSetup",
            "Register",
            "Schedule",
            "ScheduleFactory",
            "Tokenizer",
            "TokenizerFactory",
            "UpdateHook",
            "UpdateHookFactory",
        ),
        "slmkit.components",
    ),
    "causal_mask": "slmkit.blocks",
    "init_gpt2_weights": "slmkit.blocks",
    "Dropout": "slmkit.dropout_mask",
    "dropout": "slmkit.dropout_mask",
    "HookPoint": "slmkit.hookpoint",
    "Run": "slmkit.run",
}


def __getattr__(name: str) -> Any:
    """Import a torch-dependent name of the API on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'slmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Block",
    "BlockContext",
    "BlockFactory",
    "CheckpointError",
    "ConfigError",
    "Corpus",
    "CorpusFactory",
    "DataError",
    "Dropout",
    "Floor",
    "ForwardHook",
    "ForwardHookFactory",
    "HookPoint",
    "KVCache",
    "ModelDims",
    "NoOptions",
    "OptimizerFactory",
    "OptionValueError",
    "PluginError",
    "Probe",
    "ProbeContext",
    "ProbeFactory",
    "ProbeSetup",
    "Register",
    "Run",
    "RunError",
    "Schedule",
    "ScheduleFactory",
    "SlmkitError",
    "Tokenizer",
    "TokenizerFactory",
    "TrackedRun",
    "TrackedValues",
    "Tracker",
    "TrackerFactory",
    "UpdateHook",
    "UpdateHookFactory",
    "__version__",
    "boolean",
    "causal_mask",
    "dropout",
    "hookimpl",
    "in_range",
    "init_gpt2_weights",
    "non_negative",
    "one_of",
    "parameter_layer",
    "positive",
    "tracked_values",
    "two_betas",
    "weight_decay_groups",
]
