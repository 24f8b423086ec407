"""slmkit: small language models from first principles, built from plugins."""

from importlib.metadata import PackageNotFoundError, version

from slmkit.hookspecs import hookimpl

try:
    __version__ = version("slmkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__", "hookimpl"]
