"""Data-parallel training under torchrun: who this process is, its process group, collectives.

torchrun starts one process per rank and tells each who it is through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). A process
started without them is a single-process run: :class:`World` then has no process group and
every collective below returns its input unchanged, so a single-process run executes the
code, and gets the numbers, it always did.

The backend follows the device: gloo on the CPU, nccl on CUDA (each rank on the GPU of its
``LOCAL_RANK``). Every collective blocks for at most ``SLMKIT_DIST_TIMEOUT_S`` seconds
(default 300), so a rank that hangs ends the run instead of stalling it forever.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from slmkit.errors import ConfigError, RunError, SlmkitError, first_line

T = TypeVar("T")

#: environment variable: seconds a collective may wait for the other ranks
TIMEOUT_ENV = "SLMKIT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0

# What gloo and nccl say when a peer is gone; used to tell a lost rank from a bug.
_LOST_PEER = re.compile(
    r"gloo|nccl|connection (reset|closed|refused)|timed out|timeout|broken pipe|peer",
    re.IGNORECASE,
)


def timeout_s(environ: Mapping[str, str] = os.environ) -> float:
    """``SLMKIT_DIST_TIMEOUT_S`` as seconds (default 300); anything else is an error."""
    raw = environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SlmkitError(f"{TIMEOUT_ENV}: must be a positive number of seconds, got {raw!r}")
    return value


def end_rank_process(code: int) -> None:
    """End a torchrun rank's process with ``code`` now, leaving out the interpreter's teardown.

    DDP keeps its process group alive (a reference cycle on the C++ side), so gloo's worker
    threads outlive ``destroy_process_group``. At a normal exit they race with the C++
    runtime's teardown and, now and then under load, abort the process ("terminate called
    without an active exception", SIGABRT) after the run has finished and saved everything;
    torchrun then reports the run as failed. By the time this is called the run's files are
    closed, so it runs the ``atexit`` handlers, flushes the standard streams and leaves with
    ``os._exit``, which runs no destructors. A process that never created a process group
    (every run outside torchrun, and every test calling the CLI in-process) returns at once.
    """
    if not World.created_group:
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


def is_lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank died or hung."""
    return isinstance(exc, dist.DistError) or bool(_LOST_PEER.search(str(exc)))


class World:
    """The ranks of a run and this process's place among them.

    ``launched`` is true under torchrun (even with one rank: the run then has a process
    group of one); ``rank`` 0 is the main rank, the only one that writes files.
    """

    #: whether this process ever created a process group (see :func:`end_rank_process`)
    created_group = False

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 *, launched: bool = False) -> None:  # fmt: skip
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.launched = launched
        self.backend: str | None = None
        self.device = torch.device("cpu")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> World:
        """The world torchrun describes in the environment; a single process without it."""
        if "WORLD_SIZE" not in environ:
            return cls()
        values = {}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            try:
                values[key] = int(environ[key])
            except (KeyError, ValueError):
                raise SlmkitError(
                    f"WORLD_SIZE is set but {key} is {environ.get(key)!r}: start distributed "
                    "runs with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK"
                ) from None
        if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
            raise SlmkitError(f"RANK={values['RANK']} is outside WORLD_SIZE={values['WORLD_SIZE']}")
        return cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], launched=True)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the only rank that writes the run folder)."""
        return self.rank == 0

    @property
    def label(self) -> str:
        """``"rank 1: "`` under torchrun (to prefix messages), ``""`` in a single process."""
        return f"rank {self.rank}: " if self.launched else ""

    def place(self, device: torch.device, source: str) -> torch.device:
        """This rank's device: on CUDA the GPU of ``LOCAL_RANK``, made the current one."""
        if not self.launched:
            return device
        if device.type == "mps":
            raise ConfigError(
                source, "training.device",
                '"mps" cannot train under torchrun (neither gloo nor nccl handles MPS '
                'tensors); use "cpu"',
            )  # fmt: skip
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise SlmkitError(
                    f"LOCAL_RANK {self.local_rank} but this machine has "
                    f"{torch.cuda.device_count()} CUDA device(s): --nproc_per_node must not "
                    "exceed the GPUs per machine"
                )
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def join(self, device: torch.device) -> None:
        """Create the process group (gloo on the CPU, nccl on CUDA); waits for every rank."""
        self.device = device
        if not self.launched or dist.is_initialized():
            return
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        World.created_group = True
        dist.init_process_group(
            self.backend,
            timeout=timedelta(seconds=timeout_s()),
            device_id=device if device.type == "cuda" else None,
        )

    def leave(self) -> None:
        """Destroy the process group, if this process has one."""
        if self.launched and dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives (each returns its input in a single process) -----------------------

    def lost_contact(self, exc: BaseException, step: int, kept: str) -> RunError | None:
        """The error to report when ``exc`` says another rank died or hung; else None.

        ``kept`` says what the run left on disk (the intact checkpoint).
        """
        if not (self.launched and is_lost_peer(exc)):
            return None
        # torchrun's own report names the rank that died.
        return RunError(
            f"{self.label}lost contact with the other ranks at step {step} ({first_line(exc)}): "
            "a rank died or stopped responding (torchrun's report names it); "
            f"{kept}"
        )

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand every rank its result.

        The result travels as ``torch.save`` bytes read back with ``weights_only=True``,
        so it must be tensors and plain values (no ``Path``), like a checkpoint.
        An :class:`SlmkitError` raised by ``fn`` is raised on every rank (on the others
        as an :class:`SlmkitError` with the same message and exit code), so no rank is
        left waiting for a result that will never come.
        """
        if not self.launched:
            return fn()
        box: list[Any] = [None]
        error: SlmkitError | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except SlmkitError as exc:
                error = exc
                box[0] = ("error", str(exc), exc.exit_code)
        dist.broadcast_object_list(box, src=0, weights_only=True)
        if error is not None:
            raise error
        if box[0][0] == "error":
            failure = SlmkitError(f"rank 0 failed: {box[0][1]}")
            failure.exit_code = box[0][2]
            raise failure
        return box[0][1]

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` (tensors and plain values), in rank order, on rank 0; else None."""
        if not self.launched:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, weights_only=True)
        return out

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (so every rank takes the same branch)."""
        if not self.launched:
            return flag
        value = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def max_int(self, value: int) -> int:
        """The largest ``value`` of any rank."""
        if not self.launched:
            return value
        tensor = torch.tensor(value, dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over the ranks (a new tensor)."""
        if not self.launched:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the ranks (gloo has no AVG: a sum, divided)."""
        if not self.launched:
            return tensor
        return self.sum(tensor) / self.world_size
