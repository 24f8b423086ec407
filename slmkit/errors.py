"""Errors that slmkit reports to the user as one line, without a traceback."""

from __future__ import annotations

import re


class SlmkitError(Exception):
    """An error the user can fix; the CLI prints it as one line and exits non-zero.

    ``exit_code`` is 2 for bad input (experiment files, arguments, plugins) and 1 for
    failures while a run was under way.
    """

    exit_code = 2


class ConfigError(SlmkitError):
    """A bad experiment file or override: names the file and the dotted key."""

    def __init__(self, source: str, key: str | None, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


class PluginError(SlmkitError):
    """A plugin that cannot be loaded, conflicts with another, or is not enabled."""


class DataError(SlmkitError):
    """A corpus that is missing, empty, binary or too small."""


class CheckpointError(SlmkitError):
    """A checkpoint that is missing, corrupt or does not match the experiment."""


class RunError(SlmkitError):
    """A run that failed after it started (the run folder is kept)."""

    exit_code = 1


class RunInterrupted(SlmkitError):
    """A run stopped by SIGINT or SIGTERM after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class HookFailure(Exception):
    """An exception raised inside a plugin's hook, with who raised it and where.

    The trainer turns it into a :class:`RunError` that also names the step.
    """

    def __init__(self, what: str, plugin: str, cause: BaseException) -> None:
        self.what, self.plugin, self.cause = what, plugin, cause
        super().__init__(f"{what} (plugin {plugin!r}) failed: {type(cause).__name__}: {cause}")


def first_line(exc: BaseException) -> str:
    """The gist of an exception on one line: its first sentence, without a source prefix.

    (gloo prefixes its messages with a source location; torch.compile errors run long.)
    """
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../pair.cc:545] Read error ..."
    return text.split(". ")[0][:200]
