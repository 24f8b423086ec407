"""Corpus plugins: ``file`` (a text file or a folder of .txt files) and ``python_docs``.

``python_docs`` is the default: the Python language reference that every CPython
installation carries (``pydoc_data.topics``, about 460 KB of English prose and code),
so the reference experiment trains with no download.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

import slmkit


@attrs.define(frozen=True)
class FileOptions:
    """Options of the ``file`` corpus (keys of the ``[data]`` table)."""

    #: a UTF-8 text file, or a folder whose ``*.txt`` files (recursively, sorted) are read;
    #: relative paths resolve against the current directory
    path: str = "data/input.txt"


def read_text_file(path: Path) -> str:
    """Read one UTF-8 text file; binary (a NUL byte anywhere) or undecodable files are refused."""
    raw = path.read_bytes()
    nul = raw.find(b"\x00")  # memchr over the whole file: about 10 ms per 100 MB
    if nul >= 0:
        raise slmkit.OptionValueError(
            "path", f"{str(path)!r} looks binary (it contains NUL bytes, the first at byte {nul})"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise slmkit.OptionValueError(
            "path", f"{str(path)!r} is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None


class FileCorpus:
    """A text file, or every ``*.txt`` below a folder in sorted order."""

    def __init__(self, options: FileOptions) -> None:
        self.path = Path(options.path)

    def files(self) -> list[Path]:
        """The files this corpus reads, in order."""
        if self.path.is_file():
            return [self.path]
        if self.path.is_dir():
            found = sorted(p for p in self.path.rglob("*.txt") if p.is_file())
            if not found:
                raise slmkit.OptionValueError(
                    "path", f"folder {str(self.path)!r} has no .txt files"
                )
            return found
        raise slmkit.OptionValueError("path", f"no such file or folder: {str(self.path)!r}")

    def describe(self) -> dict[str, Any]:
        """The path and the files read."""
        return {"path": str(self.path), "files": len(self.files())}

    def texts(self) -> Iterator[str]:
        """Each file's text."""
        for path in self.files():
            yield read_text_file(path)


class PythonDocsCorpus:
    """The Python language reference shipped with the interpreter (``pydoc_data``)."""

    def describe(self) -> dict[str, Any]:
        """Where the text comes from."""
        import sys

        return {"source": "pydoc_data.topics", "python": sys.version.split()[0]}

    def texts(self) -> Iterator[str]:
        """The reference's topics, in sorted order."""
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions strip pydoc_data
            raise slmkit.OptionValueError(
                "corpus",
                'this Python has no pydoc_data module; use corpus = "file" with a path',
            ) from None
        yield "\n\n".join(topics[key] for key in sorted(topics))


@slmkit.hookimpl
def register_corpora(register: slmkit.Register) -> None:
    """Provide the ``file`` and ``python_docs`` corpora."""
    register("file", FileCorpus, options=FileOptions)
    register("python_docs", lambda options: PythonDocsCorpus())
