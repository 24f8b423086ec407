"""The plugins that ship with slmkit, each an ordinary plugin module.

They use only slmkit's public API (``slmkit.hookimpl``, ``slmkit.components``,
``slmkit.options``), exactly as a third-party plugin would.
"""
