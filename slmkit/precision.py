"""A run's precision: ``training.precision`` resolved on its device, autocast, grad scaler.

``"auto"`` chooses bf16 where the device computes it natively and fp32 elsewhere:

    CUDA   torch.cuda.is_bf16_supported(including_emulation=False)
    CPU    torch reports AVX-512 BF16 or AMX (:func:`cpu_capability`)
    other  fp32 (MPS, ...)

A resumed run keeps the precision its checkpoint was written with: ``"auto"`` may resolve
differently on another machine, and changing the numerics halfway would silently change
the run. The explicit choices are taken as written (fp16 only on CUDA).
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import torch

from slmkit.config.schema import Experiment
from slmkit.errors import ConfigError

#: what :func:`cpu_capability` reports for a CPU with native bf16 arithmetic
NATIVE_BF16_CPU = frozenset({"AVX512_BF16", "AMX"})


def cpu_capability() -> frozenset[str]:
    """What torch reports of this CPU: its vector capability and its bf16 instructions.

    For example ``{"AVX512", "AVX512_BF16"}``. ``torch.backends.cpu.get_cpu_capability()``
    names only the vector width ("AVX512", "AVX2", "DEFAULT"...), so the bf16 instructions
    come from torch's own checks in ``torch.cpu`` (private, but what its kernels dispatch
    on; absent in a torch without them, which then reports none).
    """
    features = {torch.backends.cpu.get_cpu_capability()}
    checks = {"AVX512_BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    for feature, check in checks.items():
        supported = getattr(torch.cpu, check, None)
        if supported is not None and supported():
            features.add(feature)
    return frozenset(features)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (not emulated through fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return bool(cpu_capability() & NATIVE_BF16_CPU)
    return False


@attrs.define
class Precision:
    """The autocast dtype of forward passes (None: fp32) and fp16's gradient scaler."""

    dtype: torch.dtype | None
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    #: the precision the run computes in: "fp32", "bf16" or "fp16"
    name: str = "fp32"
    #: ``training.precision`` as the experiment says it ("auto" or one of the above)
    requested: str = "fp32"
    #: said at the start when a resumed run keeps a precision "auto" would not choose here
    note: str | None = None

    @classmethod
    def of(cls, exp: Experiment, device: torch.device, started: str | None = None) -> Precision:
        """``training.precision`` on ``device``; ``started``: the checkpoint's, on resume.

        fp16 needs CUDA. ``"auto"`` resolves on this device, except on resume: the run
        continues in the precision it was started with.
        """
        requested = name = exp.training.precision
        note = None
        if requested == "auto":
            name = "bf16" if native_bf16(device) else "fp32"
            if started is not None and started != name:
                note = (
                    f'training.precision = "auto" chose {started} when this run started; '
                    f'it continues in {started} (on this {device.type}, "auto" chooses {name})'
                )
                name = started
        if name == "fp32":
            return cls(None, device, None, name, requested, note)
        if name == "bf16":
            return cls(torch.bfloat16, device, None, name, requested, note)
        if device.type != "cuda":
            raise ConfigError(
                exp.source, "training.precision",
                f'"fp16" needs a CUDA device (this run is on {device}); use "bf16"',
            )  # fmt: skip
        return cls(torch.float16, device, torch.amp.GradScaler("cuda"), name, requested, note)

    @property
    def label(self) -> str:
        """For the console: ``bf16``, or ``bf16 (auto)`` when "auto" chose it."""
        return f"{self.name} (auto)" if self.requested == "auto" else self.name

    def describe(self) -> dict[str, str]:
        """What ``run_start`` logs: the precision computed in, the one requested, and the
        ``precision_note`` of a resumed run that keeps a precision "auto" would not choose."""
        note = {} if self.note is None else {"precision_note": self.note}
        return {"precision": self.name, "precision_requested": self.requested, **note}

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for a forward pass (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)
