"""Test support for the tracker dashboards: a local server, headless Chromium driven over
its DevTools pipe (a page opened, polled until it shows what is checked, then its
screenshot), and a screenshot that must show something.

Everything stays on this machine: servers listen on 127.0.0.1 only, Chromium resolves no
host name (``--host-resolver-rules``) and uses no proxy, and the Hugging Face libraries
under trackio run offline.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

HOST = "127.0.0.1"
#: the browser window of every screenshot, pixels
WINDOW = (1400, 900)
#: how long a page may take to show what a check waits for (its data fetched, its charts
#: drawn), seconds: a check polls the page rather than guessing a time
PAGE_TIMEOUT = 60.0
#: how long Chromium may take to answer one DevTools command, seconds
COMMAND_TIMEOUT = 60.0
#: the environment that keeps trackio and huggingface_hub off the network and out of $HOME
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip


def chromium() -> str:
    """The Chromium executable; fails naming the package when it is missing."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(
        "chromium not found: install Debian's chromium package "
        "(apt-get install chromium; .ci/run installs it where it is missing)"
    )


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@contextmanager
def local_server(
    command: Sequence[str], url: str, log: Path, env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """Run ``command`` (a server) until ``url`` answers, for the ``with`` block; then kill
    its process group, whatever happened. Its output goes to ``log``, shown on failure."""
    with log.open("wb") as out:
        server = subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while not answers(url):
                if server.poll() is not None:
                    raise AssertionError(f"the server ended ({server.returncode}):\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{url} did not answer in {timeout:.0f}s:\n{_tail(log)}")
                time.sleep(0.25)
            yield server
        finally:
            stop_session(server)


def stop_session(server: subprocess.Popen[bytes]) -> None:
    """End the server's whole session, it and what it started (TensorBoard's data
    server): SIGTERM first, so it can tidy up, then SIGKILL for what is left."""
    for signum, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=grace)
            return


def _tail(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-3000:]


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy


def answers(url: str) -> bool:
    """Whether ``url`` answers with a success."""
    try:
        with _DIRECT.open(url, timeout=5) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError):
        return False


def get_json(url: str) -> Any:
    """GET ``url``'s JSON."""
    with _DIRECT.open(url, timeout=30) as response:
        return json.loads(response.read())


def post_json(url: str, body: Mapping[str, Any]) -> Any:
    """POST ``body`` as JSON to ``url``; its JSON answer."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with _DIRECT.open(request, timeout=30) as response:
        return json.loads(response.read())


def chromium_command(profile: Path) -> list[str]:
    """Headless Chromium with a fresh profile in ``profile``, driven over its DevTools pipe
    (``--remote-debugging-pipe``: it reads commands on its fd 3 and answers on its fd 4)."""
    return [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-proxy-server",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # nothing but here
        f"--user-data-dir={profile}", "--no-first-run", "--hide-scrollbars",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", "--remote-debugging-pipe", "about:blank",
    ]  # fmt: skip


class DevTools:
    """The Chrome DevTools Protocol over Chromium's pipe: each message a JSON object ended
    by a NUL byte; a command's answer carries its ``id`` (events in between are skipped)."""

    def __init__(self, commands: BinaryIO, answers: BinaryIO, log: Path) -> None:
        self.commands, self.answers, self.log = commands, answers, log
        self.last_id = 0
        self.pending = b""

    def send(self, method: str, session: str | None = None, **params: Any) -> Any:
        """Run ``method`` (in the page ``session``); its result. Fails on an error answer,
        a Chromium gone, or no answer in :data:`COMMAND_TIMEOUT` seconds."""
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.commands.write(json.dumps(message).encode() + b"\0")
        self.commands.flush()
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            answer = json.loads(self._message(deadline))
            if answer.get("id") == self.last_id:
                if "error" in answer:
                    raise DevToolsError(f"{method}: {answer['error']}")
                return answer["result"]

    def _message(self, deadline: float) -> bytes:
        while b"\0" not in self.pending:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.answers], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"chromium did not answer in {COMMAND_TIMEOUT:.0f}s")
            chunk = os.read(self.answers.fileno(), 1 << 20)
            if not chunk:
                raise AssertionError(f"chromium ended:\n{_tail(self.log)}")
            self.pending += chunk
        message, self.pending = self.pending.split(b"\0", 1)
        return message


class DevToolsError(Exception):
    """An error answer of the DevTools protocol (a script that threw, a bad command)."""


class Page:
    """A headless Chromium tab of :data:`WINDOW`'s size: open a URL, run scripts in it,
    wait until it shows something, take its screenshot."""

    def __init__(self, devtools: DevTools, session: str) -> None:
        self.devtools, self.session = devtools, session

    def open(self, url: str, local_storage: Mapping[str, str] | None = None) -> None:
        """Load ``url``; ``local_storage`` is put in the page's storage before its scripts
        run (the settings a dashboard keeps there)."""
        if local_storage:
            script = "".join(
                f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});"
                for k, v in local_storage.items()
            )
            self._send("Page.addScriptToEvaluateOnNewDocument", source=script)
        self._send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of the JavaScript ``expression`` in the page."""
        done = self._send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in done:
            raise DevToolsError(f"{expression}: {done['exceptionDetails']}")
        return done["result"].get("value")

    def wait_for(
        self, expression: str, what: str, ready: Callable[[Any], bool] = bool,
        timeout: float = PAGE_TIMEOUT,
    ) -> Any:  # fmt: skip
        """Poll ``expression`` until ``ready`` holds of its value and return the value; fail
        naming ``what`` and the last value after ``timeout`` s (while the page loads, a
        script that fails is "not yet")."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while True:
            with contextlib.suppress(DevToolsError):
                value = self.evaluate(expression)
                if ready(value):
                    return value
            assert time.monotonic() < deadline, (
                f"{what}: not after {timeout:.0f}s; last seen: {repr(value)[:1000]}"
            )
            time.sleep(0.25)

    def boxes(self, selector: str) -> list[Box]:
        """Where the elements ``selector`` finds are on the page, in document order."""
        found = self.evaluate(
            f"Array.from(document.querySelectorAll({json.dumps(selector)})).map(e => "
            "(r => [r.left, r.top, r.right, r.bottom])(e.getBoundingClientRect()))"
        )
        return [(round(a), round(b), round(c), round(d)) for a, b, c, d in found]

    def screenshot(self, path: Path) -> Path:
        """A PNG of what the page shows now."""
        done = self._send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(done["data"]))
        return path

    def _send(self, method: str, **params: Any) -> Any:
        return self.devtools.send(method, self.session, **params)


@contextmanager
def headless_page(profile: Path, log: Path) -> Iterator[Page]:
    """A :class:`Page` in a headless Chromium of its own (profile folder ``profile``, its
    output in ``log``), for the ``with`` block; then Chromium is closed, whatever happened."""
    to_chromium, from_chromium = os.pipe(), os.pipe()
    # its fds 3 and 4, set in the child from copies above them (so no dup2 overwrites one)
    theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chromium[0], from_chromium[1])]
    for fd in (to_chromium[0], from_chromium[1]):
        os.close(fd)

    def as_fds_3_and_4() -> None:
        os.dup2(theirs[0], 3)
        os.dup2(theirs[1], 4)

    with log.open("wb") as out:
        browser = subprocess.Popen(
            chromium_command(profile), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, pass_fds=(3, 4), preexec_fn=as_fds_3_and_4,
            env={**os.environ, "HOME": str(profile)}, start_new_session=True,
        )  # fmt: skip
    for fd in theirs:
        os.close(fd)
    with (
        os.fdopen(to_chromium[1], "wb") as commands,
        os.fdopen(from_chromium[0], "rb") as answers,
    ):
        try:
            devtools = DevTools(commands, answers, log)
            target = devtools.send("Target.createTarget", url="about:blank")["targetId"]
            session = devtools.send("Target.attachToTarget", targetId=target, flatten=True)
            page = Page(devtools, session["sessionId"])
            page._send("Page.enable")  # (scripts added before a page loads need it)
            page._send("Emulation.setDeviceMetricsOverride", width=WINDOW[0],
                       height=WINDOW[1], deviceScaleFactor=1, mobile=False)  # fmt: skip
            yield page
        finally:
            with contextlib.suppress(Exception):
                devtools.send("Browser.close")
            stop_session(browser)


def pixels(path: Path) -> np.ndarray:
    """The PNG's RGB pixels, rows x columns x 3, as integers."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int32)


def check_not_blank(path: Path, *, min_colours: int = 64, min_share: float = 0.10) -> None:
    """The picture is the window's size and shows a page: at least ``min_colours``
    distinct colours, and at least ``min_share`` of its pixels differ from the commonest
    colour (a blank page, or a lone spinner on one, has neither)."""
    rgb = pixels(path)
    assert rgb.shape[:2] == (WINDOW[1], WINDOW[0]), rgb.shape
    colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colours) >= min_colours, f"{path.name}: {len(colours)} colours only"
    share = 1 - counts.max() / counts.sum()
    assert share >= min_share, f"{path.name}: {share:.1%} of the pixels differ from the background"


#: a rectangle of a page, in pixels: left, top, right, bottom
Box = tuple[int, int, int, int]


def colour_pixels(
    path: Path, colour: tuple[int, int, int], box: Box | None = None, tolerance: int = 24
) -> int:
    """How many pixels (of ``box``, else of the whole picture) are within ``tolerance``
    (per channel) of ``colour``."""
    rgb = pixels(path)
    if box is not None:
        left, top, right, bottom = box
        rgb = rgb[top:bottom, left:right]
    near = np.abs(rgb - np.array(colour)).max(axis=2) <= tolerance
    return int(near.sum())
