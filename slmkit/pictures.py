"""matplotlib for slmkit's pictures, imported only when one is drawn (the ``plot`` extra).

``compare``'s loss curves and probes picture and ``scaling``'s fit all start from
:func:`figure_class` and end in :func:`png_bytes`, so a missing matplotlib is the same one
line everywhere and every picture is drawn in memory, with no display.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from slmkit.errors import SlmkitError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def figure_class(picture: str) -> type[Figure]:
    """matplotlib's ``Figure``, drawing to memory; a one-line error naming ``picture`` if
    matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise SlmkitError(
            f"the {picture} needs matplotlib: pip install 'slmkit[plot]' (or uv sync --extra plot)"
        ) from None
    matplotlib.use("Agg")  # draw to memory: no display needed
    from matplotlib.figure import Figure

    return Figure


def png_bytes(figure: Figure, dpi: int) -> bytes:
    """``figure`` as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
