"""The plugins that ship with slmkit, each an ordinary plugin module.

They use only slmkit's plugin API: ``import slmkit`` and the names in ``slmkit.__all__``
(``slmkit.hookimpl``, ``slmkit.HookPoint``, ``slmkit.positive``...), exactly as a
third-party plugin would.
"""
