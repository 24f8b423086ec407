"""Tests of the ``attention_maps`` forward-hook plugin.

Run them with the plugin installed (``uv pip install -e plugins/slmkit-attention-maps``)::

    uv run pytest plugins/slmkit-attention-maps/tests

The PNG files are checked by parsing them by hand (signature, chunks, CRCs, zlib), so the
tests need no image library either.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import slmkit.testing
import torch
from slmkit import OptionValueError

import slmkit_attention_maps
from slmkit_attention_maps import (
    NAME,
    PNG_SIGNATURE,
    SEPARATOR,
    AttentionMaps,
    AttentionMapsOptions,
    encode_png,
    layer_name,
    render_heads,
    to_gray,
    write_png,
)

DIST = "slmkit-attention-maps"


def parse_png(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """Check a grayscale 8-bit PNG chunk by chunk; its header fields and pixel rows."""
    assert data[:8] == PNG_SIGNATURE
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        body = data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        at += 12 + length
    assert at == len(data)
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1]
    )
    assert (depth, colour, compression, filtering, interlace) == (8, 0, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (width + 1)
    rows = []
    for y in range(height):
        line = raw[y * (width + 1) : (y + 1) * (width + 1)]
        assert line[0] == 0  # filter type None
        rows.append(line[1:])
    header = {"width": width, "height": height, "chunks": [k for k, _ in chunks]}
    return header, rows


# -- the PNG encoder --------------------------------------------------------------------------


def test_png_has_valid_chunks_and_decodes_to_the_exact_rows(tmp_path: Path) -> None:
    rows = [bytes((x * 16 + y * 3) % 256 for x in range(13)) for y in range(7)]
    path = write_png(tmp_path / "gradient.png", rows)
    header, decoded = parse_png(path.read_bytes())
    assert header == {"width": 13, "height": 7, "chunks": [b"IHDR", b"IDAT", b"IEND"]}
    assert decoded == rows
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left over


def test_png_of_one_pixel_and_of_every_gray_level() -> None:
    assert parse_png(encode_png([b"\x7f"]))[1] == [b"\x7f"]
    levels = [bytes(range(256))]
    assert parse_png(encode_png(levels))[1] == levels


def test_png_known_bytes() -> None:
    data = encode_png([b"\x00"])
    # IHDR of a 1x1 8-bit grayscale image: its CRC is fixed by the specification's bytes
    assert data[8:33] == (
        b"\x00\x00\x00\x0dIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00"
        + struct.pack(">I", zlib.crc32(b"IHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00"))
    )
    assert data.endswith(b"\x00\x00\x00\x00IEND\xae\x42\x60\x82")  # the constant IEND chunk


@pytest.mark.parametrize("rows", [[], [b""], [b"ab", b"a"]])
def test_png_refuses_bad_rows(rows: list[bytes]) -> None:
    with pytest.raises(ValueError):
        encode_png(rows)


# -- rendering --------------------------------------------------------------------------------


def test_gray_levels_use_the_square_root() -> None:
    weights = torch.tensor([0.0, 0.25, 1.0, 0.04, 1 / 255**2, 2.0, -1.0])
    # 255 sqrt(a): 0, 127.5 (halves round up), 255, 51, 1; out of [0, 1] is clamped
    assert to_gray(weights).tolist() == [0, 128, 255, 51, 1, 255, 0]


def test_render_heads_layout() -> None:
    pattern = torch.tensor(
        [
            [[1.0, 0.0], [0.25, 0.75]],
            [[1.0, 0.0], [1.0, 0.0]],
        ]
    )  # 2 heads, 2 queries, 2 keys
    rows = render_heads(pattern, cell=2, gap=1)
    assert len(rows) == 4  # 2 queries x 2 pixels
    assert all(len(r) == 2 * 2 + 2 + 2 * 2 for r in rows)  # panel, gap band, panel
    s = SEPARATOR
    assert rows[0] == bytes([255, 255, 0, 0, s, s, 255, 255, 0, 0])
    assert rows[1] == rows[0]
    assert rows[2] == bytes([128, 128, 221, 221, s, s, 255, 255, 0, 0])  # sqrt(.75)*255=220.8
    assert rows[3] == rows[2]


def test_layer_names() -> None:
    assert layer_name("blocks.0.attn.hook_pattern") == "layer_0"
    assert layer_name("blocks.12.attn.hook_pattern") == "layer_12"
    assert layer_name("encoder.attn/pattern") == "encoder_attn_pattern"


# -- the hook ---------------------------------------------------------------------------------


class FakeRun:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir


def causal_pattern(batch: int, heads: int, time: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    scores = torch.randn(batch, heads, time, time)
    mask = torch.ones(time, time, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def test_hook_keeps_the_first_sequence_of_the_first_batch_cropped(tmp_path: Path) -> None:
    hook = AttentionMaps(AttentionMapsOptions(max_tokens=5, cell=1))
    hook.start(FakeRun(tmp_path))
    first = causal_pattern(3, 2, 8, seed=0)
    hook.observe("blocks.0.attn.hook_pattern", first)
    hook.observe("blocks.0.attn.hook_pattern", causal_pattern(3, 2, 8, seed=1))  # 2nd batch
    hook.observe("blocks.1.attn.hook_pattern", causal_pattern(3, 2, 8, seed=2))
    result = hook.flush(7, "eval")
    assert result == {
        "files": ["attention_maps/step_7/layer_0.png", "attention_maps/step_7/layer_1.png"],
        "heads": 2,
        "tokens": 5,
    }
    header, rows = parse_png((tmp_path / result["files"][0]).read_bytes())
    assert (header["width"], header["height"]) == (5 + 1 + 5, 5)
    assert rows == render_heads(first[0, :, :5, :5], cell=1)
    # flushed: the next evaluation starts afresh
    assert hook.flush(8, "eval") is None


def test_hook_without_a_run_writes_nothing() -> None:
    hook = AttentionMaps(AttentionMapsOptions())
    hook.observe("blocks.0.attn.hook_pattern", causal_pattern(1, 1, 4))
    assert hook.flush(1, "eval") is None


def test_hook_refuses_what_is_no_pattern() -> None:
    hook = AttentionMaps(AttentionMapsOptions())
    with pytest.raises(ValueError, match="expected an attention pattern"):
        hook.observe("blocks.0.hook_resid_post", torch.zeros(2, 4, 8))


@pytest.mark.parametrize(("field", "value"), [("max_tokens", 0), ("cell", 0), ("cell", 33)])
def test_options_are_validated(field: str, value: Any) -> None:
    with pytest.raises(OptionValueError) as info:
        AttentionMapsOptions(**{field: value})
    assert info.value.key == field


def test_registers_the_hook() -> None:
    info = slmkit.testing.load_plugin(slmkit_attention_maps, DIST, version="0.1.0")
    assert info.error is None
    assert info.provides == {"forward_hook": [NAME]}
    component = info.component("forward_hook", NAME)
    assert component.options is AttentionMapsOptions
    assert component.factory is AttentionMaps
    assert AttentionMaps.phases == ("eval",)
    assert AttentionMaps.default_points == ("blocks.*.attn.hook_pattern",)


# -- end to end -------------------------------------------------------------------------------


def test_a_tiny_run_writes_one_image_per_layer_and_evaluation(tmp_path: Path) -> None:
    run = slmkit.testing.train_tiny(
        [slmkit_attention_maps],
        steps=4,
        folder=tmp_path,
        experiment={
            "model": {"n_heads": 2, "context_length": 16},
            "training": {"eval_every": 2},
            "forward_hooks": [{"name": NAME, "max_tokens": 8, "cell": 2}],
        },
    )  # 2 layers, d_model 32, evaluations at steps 2 and 4
    run_dir = run.run_dir

    images = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.png"))
    assert images == [
        f"attention_maps/step_{step}/layer_{layer}.png" for step in (2, 4) for layer in (0, 1)
    ]
    for image in images:
        header, rows = parse_png((run_dir / image).read_bytes())
        assert (header["width"], header["height"]) == (2 * (8 + 1 + 8), 2 * 8)
        assert rows[0][0] == 255  # the first query attends only to itself
        assert rows[0][2] == 0  # ... and never to the future

    logged = [e for e in run.events("forward_hook") if e["name"] == NAME]
    assert [(e["step"], e["phase"]) for e in logged] == [(2, "eval"), (4, "eval")]
    assert logged[0]["metrics"]["files"] == images[:2]
    assert logged[0]["metrics"]["heads"] == 2
