"""The ``attention_maps`` forward hook: attention patterns as PNG images, at evaluation.

At every evaluation it watches (``phases = ("eval",)``), the hook keeps the attention
pattern of the first sequence of the first validation batch at each watched point
(default ``blocks.*.attn.hook_pattern``) and writes one grayscale image per layer, with one
panel per head, side by side::

    <run>/attention_maps/step_<N>/layer_<i>.png

In a panel, row ``t`` is query position ``t`` and column ``s`` key position ``s``; causal
attention leaves everything right of the diagonal black. A weight ``a`` in [0, 1] becomes
the gray level ``round(255 * sqrt(a))``: a query at position ``t`` spreads its attention
over ``t + 1`` keys, so most weights are small, and the square root makes them visible
while keeping 0 black, 1 white and the order of the weights. Panels are separated by a
mid-gray (128) band. The event logged is ``{"files": [paths relative to the run folder],
...}``.

The PNG files are written by :func:`encode_png`, a minimal encoder (8-bit grayscale,
filter type 0, one zlib-compressed IDAT chunk) following the PNG specification (ISO/IEC
15948, W3C PNG 2nd edition), with nothing but ``zlib`` and ``struct``: no plotting library.

An experiment uses it with::

    [plugins]
    enable = ["slmkit-attention-maps"]

    [[forward_hooks]]
    name = "attention_maps"
    max_tokens = 64     # crop to the first 64 positions
    cell = 4            # each attention weight is a 4x4 pixel square
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import slmkit
import torch

__version__ = "0.1.0"

#: the component name experiments use: ``[[forward_hooks]] name = "attention_maps"``
NAME = "attention_maps"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: the gray level of the bands between head panels
SEPARATOR = 128


# -- a minimal PNG encoder ------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One chunk: length (4 bytes, big-endian), type, data, CRC-32 of type + data."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(rows: Sequence[bytes]) -> bytes:
    """An 8-bit grayscale PNG of the given pixel rows (one byte per pixel, all equal length).

    IHDR: width, height, bit depth 8, colour type 0 (grayscale), compression 0, filter 0,
    no interlace. IDAT: the rows, each prefixed with filter type 0 (None), deflated. IEND.
    """
    if not rows or not rows[0]:
        raise ValueError("a PNG needs at least one row of at least one pixel")
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        raise ValueError("every row of a PNG must have the same width")
    header = struct.pack(">IIBBBBB", width, len(rows), 8, 0, 0, 0, 0)
    raw = b"".join(b"\x00" + bytes(row) for row in rows)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def write_png(path: str | Path, rows: Sequence[bytes]) -> Path:
    """Write :func:`encode_png` of ``rows`` to ``path`` atomically (temporary file, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_png(rows))
    os.replace(tmp, path)
    return path


# -- attention patterns as images -----------------------------------------------------------


def to_gray(weights: torch.Tensor) -> torch.Tensor:
    """Attention weights in [0, 1] to gray levels ``round(255 * sqrt(a))`` (uint8).

    Halves round up (``floor(x + 0.5)``), so the levels do not depend on the platform.
    """
    levels = (weights.double().clamp(0, 1).sqrt() * 255 + 0.5).floor()
    return levels.to(torch.uint8)


def render_heads(pattern: torch.Tensor, cell: int = 1, gap: int = 1) -> list[bytes]:
    """One image of a layer's pattern ``(heads, queries, keys)``: the heads side by side.

    Each weight becomes a ``cell x cell`` square; panels are separated by ``gap`` cells of
    mid-gray. Returns the pixel rows, ready for :func:`encode_png`.
    """
    if pattern.dim() != 3:
        raise ValueError(f"expected (heads, queries, keys), got shape {tuple(pattern.shape)}")
    heads, queries, _ = pattern.shape
    gray = to_gray(pattern).repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)
    band = torch.full((queries * cell, gap * cell), SEPARATOR, dtype=torch.uint8)
    panels: list[torch.Tensor] = []
    for head in range(heads):
        if head:
            panels.append(band)
        panels.append(gray[head])
    image = torch.cat(panels, dim=1)
    return [bytes(row) for row in image.tolist()]


def layer_name(point: str) -> str:
    """The image's file stem: ``blocks.3.attn.hook_pattern`` -> ``layer_3``.

    A point outside ``blocks.<i>.`` (another block plugin's naming) keeps its own name,
    with every character other than letters, digits, ``_`` and ``-`` replaced by ``_``.
    """
    match = re.match(r"blocks\.(\d+)\.", point)
    if match:
        return f"layer_{match.group(1)}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", point)


@attrs.define(frozen=True)
class AttentionMapsOptions:
    """Options of ``attention_maps`` (keys of its ``[[forward_hooks]]`` table)."""

    #: crop to the first N positions (queries and keys); causal rows still sum to 1
    max_tokens: int = attrs.field(default=64, validator=slmkit.positive)
    #: pixels per attention weight, along each side
    cell: int = attrs.field(default=4, validator=slmkit.in_range(1, 32))
    #: folder inside the run folder where the images go
    folder: str = "attention_maps"


class AttentionMaps:
    """Renders the attention pattern of each watched layer at evaluation, as PNG files."""

    default_points = ("blocks.*.attn.hook_pattern",)
    phases = ("eval",)

    def __init__(self, options: AttentionMapsOptions) -> None:
        self.max_tokens = options.max_tokens
        self.cell = options.cell
        self.folder_name = options.folder
        self.run_dir: Path | None = None
        self.captured: dict[str, torch.Tensor] = {}

    def start(self, run: slmkit.Run) -> None:
        """Learn where the run folder is."""
        self.run_dir = Path(run.run_dir)

    def observe(self, point: str, pattern: torch.Tensor) -> None:
        """Keep the first sequence of the first batch seen at each point, cropped.

        ``pattern``: ``(batch, heads, queries, keys)``. The crop takes the first
        ``max_tokens`` queries and keys; a causal query never attends past itself, so the
        cropped rows are whole.
        """
        if point in self.captured:
            return
        if pattern.dim() != 4:
            raise ValueError(
                f"{point}: expected an attention pattern (batch, heads, queries, keys), "
                f"got shape {tuple(pattern.shape)}"
            )
        n = self.max_tokens
        self.captured[point] = pattern[0, :, :n, :n].to("cpu", torch.float32, copy=True)

    def flush(self, step: int, phase: str) -> dict[str, Any] | None:
        """Write one PNG per captured layer; return the files (relative to the run)."""
        captured, self.captured = self.captured, {}
        if not captured or self.run_dir is None:
            return None
        folder = self.run_dir / self.folder_name / f"step_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for point, pattern in captured.items():
            path = write_png(folder / f"{layer_name(point)}.png", render_heads(pattern, self.cell))
            files.append(path.relative_to(self.run_dir).as_posix())
        heads, queries, _ = next(iter(captured.values())).shape
        return {"files": files, "heads": heads, "tokens": queries}


@slmkit.hookimpl
def register_forward_hooks(register: slmkit.Register) -> None:
    """Provide the ``attention_maps`` forward hook."""
    register(NAME, AttentionMaps, options=AttentionMapsOptions)
