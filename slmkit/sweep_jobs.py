"""The members of a sweep as child processes: ``--jobs K`` runs up to K of them at once.

A member runs as ``python -m slmkit run --set=... --runs-dir DIR [--threads T] [--resume
RUN_DIR | --init-from X] --sweep-member TAG -- SOURCE`` with this process's interpreter
(``sys.executable``), working directory and environment. ``--sweep-member`` is a hidden
option of ``run`` carrying the member's sweep tag as JSON (:func:`slmkit.sweep.member_tag`),
so its run folder is tagged exactly as a run of ``--jobs 1`` is; the experiment and its
overrides are the same too, so at the same thread count the results are bit for bit those
of ``--jobs 1``.

- CPU threads: each child gets ``--threads max(1, T // K)``, T being torch's thread count
  here and K the members running at once (``--jobs``, or fewer when fewer members run),
  unless the experiment sets ``training.threads``: every child then uses that many.
- CUDA: where several devices are visible, each child sees one (``CUDA_VISIBLE_DEVICES``),
  the device of its job slot, round-robin.
- Output: a child's stdout and stderr come through a pipe; they go to ``console.log`` in its
  run folder once that is known (the new folder whose first event carries the member's tag).
  A failed member is reported with the last error line it printed.
- Progress: read from the child's ``log.jsonl`` as it grows (:class:`LogTail`).
- Signals: children start in a session of their own, so the terminal's Ctrl-C reaches this
  process alone; it forwards SIGINT or SIGTERM to every running child (each checkpoints and
  stops as a single run does; a second Ctrl-C stops them at once), starts no more members,
  waits for the running ones and raises :class:`~slmkit.errors.RunInterrupted`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from slmkit.build import resolve_device
from slmkit.errors import RunInterrupted
from slmkit.rundir import CONSOLE_LOG
from slmkit.signals import SignalCatcher
from slmkit.sweep_board import MemberProgress, SweepBoard, finished_line
from slmkit.sweep_plan import Member, Sweep

#: seconds between two looks at the children and their logs
POLL_S = 0.2
#: lines of a child's output kept in memory once in its console.log (for its last error)
KEPT_LINES = 50


def child_threads(member: Member, parent_threads: int, jobs: int) -> int | None:
    """``--threads`` for a member's process (``None``: the experiment sets its own)."""
    if member.exp.training.threads:
        return None
    return max(1, parent_threads // jobs)


def visible_devices(environ: Mapping[str, str], device_count: int) -> list[str]:
    """The CUDA devices this process may hand out, as ``CUDA_VISIBLE_DEVICES`` names them."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(device_count)]


def child_environment(slot: int, on_cuda: bool) -> dict[str, str]:
    """The environment of a member's process in job slot ``slot``: this one's, with one CUDA
    device of its own when it trains on CUDA and several devices are visible."""
    import torch

    env = dict(os.environ)
    if on_cuda:
        devices = visible_devices(os.environ, torch.cuda.device_count())
        if len(devices) > 1:
            env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    return env


def child_command(sweep: Sweep, member: Member, threads: int | None, init_from: str | None,
                  debug: bool) -> list[str]:  # fmt: skip
    """The command line of a member's process (``--set=VALUE``, ``-- SOURCE``: values and
    names that start with ``-`` stay values)."""
    command = [sys.executable, "-m", "slmkit", *(["--debug"] if debug else []), "run"]
    command += [f"--set={value}" for value in member.overrides]
    command.append(f"--runs-dir={sweep.runs_dir}")
    if threads is not None:
        command.append(f"--threads={threads}")
    if member.resume is not None:
        command.append(f"--resume={member.resume}")
    elif init_from:
        command.append(f"--init-from={init_from}")
    command.append(f"--sweep-member={json.dumps(sweep.tag(member))}")
    return [*command, "--", sweep.source]


class LogTail:
    """The events a growing ``log.jsonl`` gained since the last look (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path, self._offset, self._partial = path, 0, b""

    def new_events(self) -> list[dict[str, Any]]:
        """Events appended since the last call."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


def first_event(run_dir: Path) -> dict[str, Any] | None:
    """The first event of a run folder's log, once its line is complete."""
    try:
        with open(run_dir / "log.jsonl", "rb") as f:
            line = f.readline()
        event = json.loads(line) if line.endswith(b"\n") else None
    except (OSError, ValueError):
        return None
    return event if isinstance(event, dict) else None


class NewFolders:
    """Run folders that appear in the runs folder, matched to members by their sweep tag."""

    def __init__(self, runs_dir: Path, sweep_id: str) -> None:
        self.runs_dir, self.sweep_id = runs_dir, sweep_id
        self._settled = set(self._listing())  # there before: no member's new folder

    def _listing(self) -> list[Path]:
        try:
            return [p for p in self.runs_dir.iterdir() if p.is_dir()]
        except OSError:  # not created yet
            return []

    def found(self) -> dict[int, Path]:
        """``{member index: run folder}`` of the folders that started logging since."""
        found = {}
        for folder in self._listing():
            if folder in self._settled:
                continue
            event = first_event(folder)
            if event is None:
                continue  # its first line is not written yet: look again later
            self._settled.add(folder)
            tag = event.get("sweep")
            if isinstance(tag, dict) and tag.get("id") == self.sweep_id:
                found[tag.get("index")] = folder
        return {index: path for index, path in found.items() if isinstance(index, int)}


class Job:
    """One member's process, its output, and what its log says of its progress."""

    def __init__(self, member: Member, shown: MemberProgress, slot: int, command: list[str],
                 env: dict[str, str]) -> None:  # fmt: skip
        self.member, self.shown, self.slot = member, shown, slot
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
        self.output: list[str] = []  # every line the child printed
        self._written = 0  # of them, in console.log
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        self.run_dir: Path | None = None
        self.tail: LogTail | None = None
        self.val_loss: float | None = None
        self.run_id: str | None = None
        shown.state = "running"
        if member.resume is not None:
            self.attach(member.resume)

    def _read(self, stream: IO[str] | None) -> None:
        for line in stream or ():
            self.output.append(line.rstrip("\n"))

    def attach(self, run_dir: Path) -> None:
        """Follow the member's run folder from now on."""
        self.run_dir, self.tail = run_dir, LogTail(run_dir / "log.jsonl")

    def follow(self) -> None:
        """Copy new output to ``console.log``; read new events into the member's progress."""
        if self.run_dir is None or self.tail is None:
            return
        end = len(self.output)  # the reader thread may append meanwhile: up to here
        lines, self._written = self.output[self._written : end], end
        if lines:
            try:
                with open(self.run_dir / CONSOLE_LOG, "a", encoding="utf-8") as f:
                    f.write("".join(f"{line}\n" for line in lines))
            except OSError:
                pass  # the run's own log.jsonl has what matters; the console copy is a help
        written = self._written - KEPT_LINES  # kept in memory: the last lines, for errors
        if written > 0:
            del self.output[:written]
            self._written -= written
        shown = self.shown
        for event in self.tail.new_events():
            name = event.get("event")
            if name == "run_start":
                shown.step = shown.start_step = event.get("resumed_from_step") or 0
                shown.max_steps = event.get("max_steps") or shown.max_steps
                self.run_id = event.get("run_id")
            elif name == "train_step":
                shown.step, shown.loss = event.get("step", shown.step), event.get("train_loss")
            elif name == "eval":
                self.val_loss = event.get("val_loss")

    def ended(self) -> bool:
        """Whether the process has exited (its output then read to the end)."""
        if self.proc.poll() is None:
            return False
        self._reader.join()
        self.follow()
        return True

    def error_line(self) -> str:
        """The last error it printed (``slmkit: ...``), or its last line, or its exit status."""
        lines = [line.strip() for line in self.output if line.strip()]
        errors = [line for line in lines if line.startswith("slmkit: ")]
        return (errors or lines or [f"exit status {self.proc.returncode}"])[-1]


class Forwarder(SignalCatcher):
    """SIGINT and SIGTERM while the children run: stop starting members, pass it on to each."""

    def __init__(self, running: list[Job]) -> None:
        super().__init__()
        self.running = running

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Keep the first signal and send this one to every child still running."""
        super().on_signal(signum, frame)
        for job in self.running:
            if job.proc.poll() is None:
                job.proc.send_signal(signum)


def run_jobs(
    sweep: Sweep,
    members: Sequence[tuple[Member, MemberProgress]],
    jobs: int,
    board: SweepBoard,
    *,
    init_from: str | None,
    debug: bool,
    resume_command: str,
) -> list[MemberProgress]:
    """Run ``members`` as up to ``jobs`` processes at once; the ones that failed.

    Ctrl-C or SIGTERM: the running members checkpoint and stop, and
    :class:`RunInterrupted` is raised once they have.
    """
    import torch

    jobs = max(1, min(jobs, len(members)))
    parent_threads = torch.get_num_threads()
    # every member's device is checked before the first starts
    on_cuda = {m.index: resolve_device(m.exp.training.device, sweep.source).type == "cuda"
               for m, _ in members}  # fmt: skip
    waiting = deque(members)
    running: list[Job] = []
    failed: list[MemberProgress] = []
    folders = NewFolders(sweep.runs_dir, sweep.sweep_id)
    with Forwarder(running) as stop:
        try:
            while waiting or running:
                while waiting and len(running) < jobs and stop.received is None:
                    member, shown = waiting.popleft()
                    slot = min(set(range(jobs)) - {job.slot for job in running})
                    threads = child_threads(member, parent_threads, jobs)
                    command = child_command(sweep, member, threads, init_from, debug)
                    env = child_environment(slot, on_cuda[member.index])
                    running.append(Job(member, shown, slot, command, env))
                    if stop.received is not None:  # it came while this one started
                        running[-1].proc.send_signal(stop.received)
                    board.event(f"sweep {sweep.sweep_id}: {shown.name} started: "
                                f"{' '.join(member.combo)}")  # fmt: skip
                time.sleep(POLL_S)
                unplaced = {job.member.index: job for job in running if job.run_dir is None}
                for index, folder in (folders.found() if unplaced else {}).items():
                    if index in unplaced:
                        unplaced[index].attach(folder)
                for job in running:
                    job.follow()
                board.refresh()  # before the ends: a member's last steps show, however short
                for job in [job for job in running if job.ended()]:
                    running.remove(job)
                    _report(sweep, job, board, failed, stop.received)
        finally:
            for job in running:  # only after an error here: leave no child behind
                job.proc.terminate()
                job.proc.wait()
    board.refresh(force=True)
    board.close()
    if stop.received is not None:
        name = signal.Signals(stop.received).name
        finished = sum(m.state == "finished" for _, m in members)
        raise RunInterrupted(
            f"{name}: the sweep stopped, {finished} of the {len(members)} runs it had to do "
            f"finished, the running ones saved a checkpoint; resume it with: {resume_command}",
            128 + stop.received,
        )
    return failed


def _report(sweep: Sweep, job: Job, board: SweepBoard, failed: list[MemberProgress],
            stopping: int | None) -> None:  # fmt: skip
    shown, code = job.shown, job.proc.returncode
    if code == 0:
        shown.state = "finished"
        board.event(f"sweep {sweep.sweep_id}: {finished_line(shown, job.val_loss, job.run_id)}")
    elif stopping is not None and code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        shown.state = "stopped"
        board.event(f"sweep {sweep.sweep_id}: {shown.name} stopped: {job.error_line()}")
    else:
        shown.state = "failed"
        failed.append(shown)
        board.event(f"sweep {sweep.sweep_id}: {shown.name} failed: {job.error_line()}", error=True)
