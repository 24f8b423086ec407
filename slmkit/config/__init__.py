"""Experiment files: the schema, strict structuring, reading with overrides, resolution.

- :mod:`~slmkit.config.schema`: the tables (``[model]``, ``[training]``...) and :class:`Experiment`;
- :mod:`~slmkit.config.structure`: TOML values -> attrs classes, never coerced, first error named;
- :mod:`~slmkit.config.reading`: TOML files and ``--set`` overrides;
- :mod:`~slmkit.config.resolve`: tables that pick a component, resolved against the plugins;
- :mod:`~slmkit.config.diff`: which dotted keys differ between two experiments, and
  ``config_hash``, the hash of what defines one.

Only ``resolve`` knows the plugin manager; ``slmkit compare`` diffs keys without it.
"""
