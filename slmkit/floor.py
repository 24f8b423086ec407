"""The floor of a corpus whose source is known: the best loss any model can reach.

A corpus may define ``floor(val_text, context_length, n_windows) -> Floor`` (see the
``Corpus`` protocol in :mod:`slmkit.components`). The kernel calls it once per run, on the
validation text cut into the windows the model is scored on, writes the result to the
run folder's ``floor.json`` (a resumed run reads it back instead of computing it again),
and logs with every evaluation

    val_floor   the floor, nats per character
    val_excess  val_loss / chars_per_token - val_floor, nats per character

Both are per *character*, so runs with different tokenizers compare: ``val_loss`` is per
token, and ``chars_per_token`` is the corpus's characters per token (1 for ``char``). For
the char tokenizer the floor covers exactly the targets the validation loss averages; for
a tokenizer with longer tokens the floor is still that of windows of
``context_length + 1`` characters, so its excess is approximate (its windows see more
characters of context).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs

#: the run folder's file holding the floor
FLOOR_FILE = "floor.json"


@attrs.define(frozen=True)
class Floor:
    """What a corpus with a known source reports about its validation windows.

    ``Floor(val_loss, entropy_rate, entropy_rate_exact, targets)``: ``val_loss``, the mean
    Bayes-optimal negative log-likelihood of the validation targets given each window's
    own earlier characters (nats per character, float64); ``entropy_rate``, the source's
    entropy rate (nats per character), exact when ``entropy_rate_exact``, otherwise an
    estimate (hidden-state sources have no closed form); ``targets``, the characters scored.
    """

    val_loss: float
    entropy_rate: float
    entropy_rate_exact: bool
    targets: int

    def as_json(self) -> dict[str, Any]:
        """The floor as JSON values (what ``floor.json`` holds)."""
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Floor:
        """Read back what :meth:`as_json` wrote."""
        return cls(
            val_loss=float(data["val_loss"]),
            entropy_rate=float(data["entropy_rate"]),
            entropy_rate_exact=bool(data["entropy_rate_exact"]),
            targets=int(data["targets"]),
        )


def has_floor(corpus: object) -> bool:
    """Whether the corpus can compute a floor."""
    return callable(getattr(corpus, "floor", None))


def read_floor(run_dir: Path) -> Floor | None:
    """The floor cached in a run folder, or None when it holds none (or an unreadable one)."""
    try:
        return Floor.from_json(json.loads((run_dir / FLOOR_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def floor_metrics(floor: Floor | None, val_loss: float, chars_per_token: float) -> dict[str, float]:
    """``val_floor`` and ``val_excess`` for the eval event; nothing without a floor."""
    if floor is None:
        return {}
    per_char = val_loss / chars_per_token if math.isfinite(val_loss) else val_loss
    return {"val_floor": floor.val_loss, "val_excess": per_char - floor.val_loss}
