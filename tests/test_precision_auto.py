"""``training.precision = "auto"``: bf16 where the device computes it natively, else fp32.

The CPU's capability is faked (``torch.backends.cpu.get_cpu_capability`` and torch's bf16
checks, or :func:`slmkit.precision.cpu_capability` itself), and so is CUDA's bf16 support.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from conftest import events, losses, train

from slmkit import checkpoint, precision
from slmkit.cli import main
from slmkit.config.resolve import load_experiment
from slmkit.errors import ConfigError
from slmkit.plugins import PluginManager
from slmkit.precision import Precision
from slmkit.progress import Console
from slmkit.train import Trainer

AUTO = {"training": {"precision": "auto"}}


def fake_cpu(monkeypatch: pytest.MonkeyPatch, *features: str) -> None:
    """This CPU, as torch reports it, has exactly ``features``."""
    monkeypatch.setattr(precision, "cpu_capability", lambda: frozenset(features))


def resolve(write_experiment, manager: PluginManager, device: str, setting: str = "auto"):
    path = write_experiment({"training": {"precision": setting}})
    return Precision.of(load_experiment(path, manager), torch.device(device))


@pytest.mark.parametrize(
    ("capability", "bf16_instruction", "amx", "features", "expected"),
    [
        ("AVX512", True, False, {"AVX512", "AVX512_BF16"}, "bf16"),  # Cooper Lake, Zen 4...
        ("AVX512", False, True, {"AVX512", "AMX"}, "bf16"),  # Sapphire Rapids...
        ("AVX512", False, False, {"AVX512"}, "fp32"),  # AVX-512 without bf16 instructions
        ("AVX2", False, False, {"AVX2"}, "fp32"),
        ("DEFAULT", False, False, {"DEFAULT"}, "fp32"),
    ],
)
def test_auto_on_a_cpu_follows_torchs_capability(
    write_experiment, manager, monkeypatch, capability, bf16_instruction, amx, features, expected
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_instruction)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert precision.cpu_capability() == features
    chosen = resolve(write_experiment, manager, "cpu")
    assert (chosen.name, chosen.requested) == (expected, "auto")
    assert chosen.dtype == (torch.bfloat16 if expected == "bf16" else None)
    assert chosen.scaler is None
    assert chosen.label == f"{expected} (auto)"
    assert chosen.describe() == {"precision": expected, "precision_requested": "auto"}


def test_auto_on_cuda_asks_for_native_bf16(write_experiment, manager, monkeypatch) -> None:
    asked: list[bool] = []
    for native, expected in ((True, "bf16"), (False, "fp32")):

        def supported(including_emulation: bool = True, native: bool = native) -> bool:
            asked.append(including_emulation)
            return native

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
        fake_cpu(monkeypatch, "AVX512", "AMX")  # the CPU's bf16 does not decide for CUDA
        assert resolve(write_experiment, manager, "cuda").name == expected
    assert asked == [False, False]  # emulated bf16 (through fp32) is not native


def test_auto_elsewhere_is_fp32_and_explicit_choices_stay_as_written(
    write_experiment, manager, monkeypatch
) -> None:
    fake_cpu(monkeypatch, "AVX512", "AVX512_BF16")
    assert resolve(write_experiment, manager, "mps").name == "fp32"
    fake_cpu(monkeypatch, "AVX2")  # no native bf16: an explicit bf16 is still honoured
    explicit = resolve(write_experiment, manager, "cpu", "bf16")
    assert (explicit.name, explicit.requested, explicit.label) == ("bf16", "bf16", "bf16")
    assert resolve(write_experiment, manager, "cpu", "fp32").dtype is None
    with pytest.raises(ConfigError, match='"fp16" needs a CUDA device'):
        resolve(write_experiment, manager, "cpu", "fp16")


def test_the_precision_auto_chose_is_logged_shown_and_validated(
    write_experiment, manager, monkeypatch, tmp_path, capsys
) -> None:
    path = write_experiment(AUTO)
    fake_cpu(monkeypatch, "AVX512", "AVX512_BF16")
    assert main(["validate", str(path)]) == 0
    assert "# precision: bf16 (auto) on cpu\n" in capsys.readouterr().out
    out = io.StringIO()
    trainer = Trainer(load_experiment(path, manager), manager, str(path),
                      runs_dir=tmp_path / "runs", console=Console(out))  # fmt: skip
    run_dir = Path(trainer.run()["run_dir"])
    (start,) = events(run_dir, "run_start")
    assert (start["precision"], start["precision_requested"]) == ("bf16", "auto")
    assert "precision_note" not in start
    assert "parameters on cpu (bf16 (auto)), " in out.getvalue()
    assert checkpoint.load(run_dir)["precision"] == "bf16"
    fp32 = train(write_experiment(), tmp_path / "fp32", manager)
    assert losses(run_dir) != losses(fp32)  # autocast did take effect
    assert events(fp32, "run_start")[0]["precision"] == "fp32"


def test_a_resumed_auto_run_keeps_the_precision_it_started_with(
    write_experiment, manager, monkeypatch, tmp_path
) -> None:
    path = write_experiment({**AUTO, "training": {**AUTO["training"], "max_steps": 6}})
    fake_cpu(monkeypatch, "AVX512", "AMX")
    full = train(path, tmp_path / "full", manager)
    half = train(path, tmp_path / "half", manager, ["training.max_steps=3"])
    fake_cpu(monkeypatch, "AVX2")  # the same run resumed on a machine without native bf16
    out = io.StringIO()
    trainer = Trainer(load_experiment(path, manager), manager, str(path), resume=half,
                      console=Console(out))  # fmt: skip
    trainer.run()
    note = (
        'training.precision = "auto" chose bf16 when this run started; it continues in '
        'bf16 (on this cpu, "auto" chooses fp32)'
    )
    assert f"warning: {note}\n" in out.getvalue()
    starts = events(half, "run_start")
    assert [s["precision"] for s in starts] == ["bf16", "bf16"]
    assert starts[1]["precision_note"] == note
    assert losses(half) == losses(full)  # the numerics did not change halfway
