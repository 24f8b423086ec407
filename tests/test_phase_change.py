"""The induction heads' phase change, reproduced by ``experiments/induction_heads.toml``.

As in Olsson et al. (2022): a head's induction score jumps from near 0 to above 0.5 within
a few evaluations, at the evaluations where the loss on the repeated half of the probe's
sequences drops. About 40 seconds of one core (docs/probes.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, events, train

from slmkit.plugins import PluginManager

EXPERIMENT = ROOT / "experiments" / "induction_heads.toml"
#: one thread and the CPU, as the run docs/probes.md reports: the same numbers every time
SAME_EVERYWHERE = ["training.threads=1", "training.device=cpu"]


def first_index(values: list[float], above: float) -> int:
    """The first position where ``values`` exceeds ``above``."""
    return next(i for i, v in enumerate(values) if v > above)


@pytest.mark.slow
def test_an_induction_head_forms_at_the_steps_where_the_repeated_half_loss_drops(
    tmp_path: Path, manager: PluginManager
) -> None:
    run_dir = train(EXPERIMENT, tmp_path / "runs", manager, SAME_EVERYWHERE)
    induction = [e for e in events(run_dir, "probe") if e["probe"] == "induction"]
    previous = [e for e in events(run_dir, "probe") if e["probe"] == "previous_token"]
    steps = [e["step"] for e in induction]
    assert steps == list(range(50, 2001, 50))  # every evaluation
    best = [max(max(heads) for heads in e["metrics"]["score"]) for e in induction]
    drop = [e["metrics"]["loss_drop"] for e in induction]

    assert best[0] < 0.2 and best[-1] > 0.5, best
    formed = first_index(best, 0.5)
    half_drop = first_index(drop, drop[-1] / 2)
    assert abs(formed - half_drop) <= 2, (steps[formed], steps[half_drop])
    # a jump, not a drift: from below 0.2 to above 0.5 within 4 evaluations (200 steps)
    last_low = max(i for i in range(formed) if best[i] < 0.2)
    assert formed - last_low <= 4, (steps[last_low], steps[formed])
    # the repeated half becomes predictable; the first half (random tokens) stays as it was
    first_half = [e["metrics"]["loss_first_half"] for e in induction]
    repeat_half = [e["metrics"]["loss_repeat_half"] for e in induction]
    assert repeat_half[0] > 0.95 * first_half[0] and repeat_half[-1] < 0.4 * first_half[-1]
    # the previous-token head it needs forms in layer 0 alongside
    layer_0 = [max(e["metrics"]["score"][0]) for e in previous]
    assert layer_0[0] < 0.2 and layer_0[-1] > 0.5, layer_0
