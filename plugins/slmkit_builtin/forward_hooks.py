"""Built-in forward hooks: ``activation_stats``, ``attention_entropy`` and ``capture``.

Forward hooks only look: the kernel hands them detached activations and discards what they
return, so a run with them enabled computes exactly what it computes without them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import torch

import slmkit

STATS = ("mean", "std", "rms", "abs_max", "frac_near_zero")


@attrs.define(frozen=True)
class ActivationStatsOptions:
    """Options of ``activation_stats``."""

    #: |activation| below this counts as "near zero" (dead units, saturation)
    near_zero: float = attrs.field(default=1e-3, validator=slmkit.positive)


class ActivationStats:
    """Mean, std, RMS, largest magnitude and fraction near zero of each watched point.

    The statistics of a point are computed on the device as one small tensor while the
    forward pass runs and read back once, when the pass ends.
    """

    default_points = ("blocks.*.hook_resid_post",)
    phases = ("train",)

    def __init__(self, options: ActivationStatsOptions) -> None:
        self.near_zero = options.near_zero
        self.pending: dict[str, torch.Tensor] = {}

    def observe(self, point: str, activation: torch.Tensor) -> None:
        """Reduce one activation to its five statistics."""
        x = activation.float()
        n = x.numel()
        var, mean = torch.var_mean(x, correction=0)  # one pass for both moments
        smallest, largest = torch.aminmax(x)
        rms = (var + mean * mean).sqrt()  # E[x^2] = Var[x] + E[x]^2
        std = (var * (n / (n - 1))).sqrt() if n > 1 else var.new_tensor(float("nan"))
        near_zero = (x.abs() < self.near_zero).sum() / n
        self.pending[point] = torch.stack(
            [mean, std, rms, torch.maximum(-smallest, largest), near_zero]
        )

    def flush(self, step: int, phase: str) -> dict[str, Any] | None:
        """``{point: {statistic: value}}`` for the pass that just ended."""
        if not self.pending:
            return None
        points = list(self.pending)
        values = torch.stack([self.pending[p] for p in points]).tolist()  # one device sync
        self.pending.clear()
        return {p: dict(zip(STATS, v, strict=True)) for p, v in zip(points, values, strict=True)}


def head_entropy(pattern: torch.Tensor) -> torch.Tensor:
    """Each head's entropy (nats) of ``pattern`` (batch, heads, queries, keys), averaged
    over the batch and the queries: one value per head."""
    entropy = -torch.special.xlogy(pattern.float(), pattern.float()).sum(dim=-1)
    return entropy.mean(dim=(0, 2))


class AttentionEntropy:
    """Mean entropy (nats) of each head's attention distribution, per watched layer.

    Low entropy: a head attends sharply to few positions; high: it spreads out. The causal
    mask caps position t's entropy at ln(t + 1).
    """

    default_points = ("blocks.*.attn.hook_pattern",)
    phases = ("train",)

    def __init__(self, options: Any) -> None:
        self.pending: dict[str, torch.Tensor] = {}

    def observe(self, point: str, pattern: torch.Tensor) -> None:
        """``pattern``: (batch, heads, queries, keys), rows summing to 1."""
        self.pending[point] = head_entropy(pattern)

    def flush(self, step: int, phase: str) -> dict[str, Any] | None:
        """``{point: [entropy of head 0, head 1, ...]}``."""
        result = {p: t.tolist() for p, t in self.pending.items()}
        self.pending.clear()
        return result or None


@attrs.define(frozen=True)
class CaptureOptions:
    """Options of ``capture``."""

    #: folder inside the run folder where the captures go
    folder: str = "captures"


class Capture:
    """Saves the watched activations of the first validation batch of an evaluation.

    Written to ``<run>/captures/step_<N>.pt`` as ``{point: tensor}`` (CPU tensors, loadable
    with ``torch.load(path, weights_only=True)``) for offline study.
    """

    default_points = ("blocks.*.hook_resid_post",)
    phases = ("eval",)

    def __init__(self, options: CaptureOptions) -> None:
        self.folder_name = options.folder
        self.run_dir: Path | None = None
        self.captured: dict[str, torch.Tensor] = {}

    def start(self, run: slmkit.Run) -> None:
        """Learn where the run folder is."""
        self.run_dir = Path(run.run_dir)

    def observe(self, point: str, activation: torch.Tensor) -> None:
        """Keep the first batch seen at each point."""
        if point not in self.captured:
            self.captured[point] = activation.to("cpu", copy=True)

    def flush(self, step: int, phase: str) -> dict[str, Any] | None:
        """Write the captured tensors; log where they went."""
        if not self.captured or self.run_dir is None:
            return None
        folder = self.run_dir / self.folder_name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.captured, tmp)
        os.replace(tmp, path)
        shapes = {p: list(t.shape) for p, t in self.captured.items()}
        self.captured = {}
        return {"path": str(path.relative_to(self.run_dir)), "shapes": shapes}


@slmkit.hookimpl
def register_forward_hooks(register: slmkit.Register) -> None:
    """Provide ``activation_stats``, ``attention_entropy`` and ``capture``."""
    register("activation_stats", ActivationStats, options=ActivationStatsOptions)
    register("attention_entropy", AttentionEntropy)
    register("capture", Capture, options=CaptureOptions)
