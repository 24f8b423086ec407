"""Checkpoints: atomic writes, safe and verified loads, and the RNG state for exact resume.

A checkpoint holds only tensors and plain Python values (the experiment as a dict, RNG
states as tensors and tuples), so ``torch.load(weights_only=True)`` reads it and loading
a checkpoint can never execute code. Each carries a sha256 of its own contents: torch's
file format does not notice flipped bytes inside tensor data, so a damaged file would
otherwise load with wrong weights.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray

from slmkit.errors import CheckpointError
from slmkit.rundir import atomic_file, fsync_dir, temp_path

FORMAT_VERSION = 1
LATEST = "latest.pt"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
REQUIRED_KEYS = ("format", "step", "model", "experiment", "tokenizer")


def _feed(hasher: Any, value: Any) -> None:
    """Hash a nested structure of tensors and plain values, in a fixed order."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        hasher.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        hasher.update(b"{")
        for key in sorted(value, key=repr):
            _feed(hasher, key)
            _feed(hasher, value[key])
        hasher.update(b"}")
    elif isinstance(value, list | tuple):
        hasher.update(b"[" if isinstance(value, list) else b"(")
        for item in value:
            _feed(hasher, item)
        hasher.update(b"]")
    else:
        hasher.update(repr(value).encode())


def digest(payload: dict[str, Any]) -> str:
    """sha256 of a checkpoint payload's contents (its ``checksum`` entry left out)."""
    hasher = hashlib.sha256()
    _feed(hasher, {k: v for k, v in payload.items() if k != "checksum"})
    return hasher.hexdigest()


def atomic_save(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` (plus its checksum) so that a crash leaves the old or the new file.

    Through :func:`slmkit.rundir.atomic_file`: on any error ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "checksum": digest(payload)}
    with atomic_file(path) as f:
        try:
            torch.save(payload, f)
        except RuntimeError as exc:
            # torch reports a failed write of the file (a full disk) as its own RuntimeError,
            # raised while the OSError is handled: give the caller the OSError.
            cause = os_error_behind(exc)
            if cause is None:
                raise
            raise cause from None


def os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``, if any: ``exc`` itself, its cause or its context."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain; never loop on a cyclic one
        if seen is None or isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def point_latest(step_file: Path) -> Path:
    """Make ``latest.pt`` beside ``step_file`` the same file, atomically (hard link)."""
    latest = step_file.with_name(LATEST)
    tmp = temp_path(latest)
    tmp.unlink(missing_ok=True)
    try:
        os.link(step_file, tmp)
        os.replace(tmp, latest)
    except OSError:  # file systems without hard links: copy instead
        tmp.unlink(missing_ok=True)
        atomic_save(torch.load(step_file, map_location="cpu", weights_only=True), latest)
    fsync_dir(latest.parent)
    return latest


def step_files(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step_<N>.pt`` files in ``folder``, oldest first."""
    found = []
    for path in folder.glob("step_*.pt") if folder.is_dir() else []:
        match = _STEP_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``latest.pt`` stays)."""
    for _step, path in step_files(folder)[:-keep]:
        path.unlink(missing_ok=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run folder meaning its ``checkpoints/latest.pt``."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / LATEST
        if not candidate.is_file():
            raise CheckpointError(f"{path}: no checkpoints/{LATEST} in this folder")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``, tensors onto the CPU) and check it."""
    path = resolve(path)
    try:
        with warnings.catch_warnings():  # torch warns of old pickle protocols: one line only
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a loadable slmkit checkpoint ({_unloadable(path, exc)})"
        ) from None
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not an slmkit checkpoint (missing keys)")
    if payload["format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format']}, this slmkit reads {FORMAT_VERSION}"
        )
    if "checksum" in payload and payload["checksum"] != digest(payload):
        raise CheckpointError(f"{path}: checksum mismatch: the file is damaged")
    return payload


def _unloadable(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` could not read ``path``, in a few words."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if "Weights only load failed" in str(exc):  # it holds something besides tensors
        after = [ln for i, ln in enumerate(lines) if i and "WeightsUnpickler error" in lines[i - 1]]
        why = next((ln for ln in lines if "GLOBAL" in ln), after[0] if after else "")
        return "refused by the weights-only loader, which never runs code: " + (
            why or "it holds more than tensors and plain values"
        )
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        return "not a file torch.save wrote, or one cut short"
    return lines[0] if lines else type(exc).__name__


def load_newest_good(path: str | Path) -> tuple[Path, dict[str, Any], list[str]]:
    """Load a checkpoint; for a run folder, the newest one that loads and verifies.

    A run folder means ``latest.pt``, then the ``step_<N>.pt`` files newest first.
    Returns the path loaded, its payload and one line per damaged file skipped. An
    explicit checkpoint file gets no fallback.
    """
    path = Path(path)
    if not path.is_dir():
        file = resolve(path)
        return file, load(file), []
    folder = path / "checkpoints"
    candidates = [folder / LATEST] + [p for _, p in reversed(step_files(folder))]
    skipped: list[str] = []
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            return candidate, load(candidate), skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    if skipped:
        raise CheckpointError(f"{path}: no loadable checkpoint: " + "; ".join(skipped))
    raise CheckpointError(f"{path}: no checkpoints in this folder")


def kept_note(run_dir: Path) -> str:
    """What a failed run left: ``the last checkpoint, <path>, is intact`` or that none was."""
    latest = run_dir / "checkpoints" / LATEST
    if latest.exists():
        return f"the last checkpoint, {latest}, is intact"
    return "no checkpoint had been written yet"


def run_dir_of(checkpoint_path: Path) -> Path:
    """The run folder a checkpoint lives in (``<run>/checkpoints/<file>``)."""
    return checkpoint_path.resolve().parent.parent


# -- random number generators ----------------------------------------------------------


def seed_all(seed: int) -> None:
    """Seed every RNG a run may draw from (see :func:`rng_state`)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    """Every RNG a run may draw from: torch (CPU and CUDA), Python, NumPy."""
    # numpy's stubs type the no-argument call as the dict form; the default (legacy=True)
    # returns the MT19937 tuple
    kind, keys, pos, has_gauss, cached = cast(
        "tuple[str, NDArray[np.uint32], int, int, float]", np.random.get_state()
    )
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
