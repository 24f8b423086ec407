"""Test support for the tracker dashboards: a local server, headless Chromium, and a
screenshot that must show something.

Everything stays on this machine: servers listen on 127.0.0.1 only, Chromium resolves no
host name (``--host-resolver-rules``) and uses no proxy, and the Hugging Face libraries
under trackio run offline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HOST = "127.0.0.1"
#: the browser window of every screenshot, pixels
WINDOW = (1400, 900)
#: the virtual time Chromium gives a page before its screenshot, ms: TensorBoard and
#: trackio fetch their data and draw their charts in it (virtual time runs ahead when the
#: page waits on nothing, so this costs a few seconds of real time)
VIRTUAL_TIME_MS = 10_000
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


def chromium_command(url: str, profile: Path, *output: str) -> list[str]:
    """Headless Chromium loading ``url`` in a fresh profile, then ``output`` (its
    ``--screenshot=PATH`` or ``--dump-dom``)."""
    return [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-proxy-server",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # nothing but here
        f"--user-data-dir={profile}", "--no-first-run", "--hide-scrollbars",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        *output, url,
    ]  # fmt: skip


def _chromium(url: str, profile: Path, *output: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        chromium_command(url, profile, *output), capture_output=True, text=True,
        timeout=180, check=False, env={**os.environ, "HOME": str(profile)},
    )  # fmt: skip
    assert done.returncode == 0, f"chromium failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done


def screenshot(url: str, path: Path, profile: Path) -> Path:
    """A PNG of ``url`` as headless Chromium draws it in a :data:`WINDOW` window."""
    _chromium(url, profile, f"--screenshot={path}")
    assert path.is_file(), f"chromium wrote no screenshot of {url}"
    return path


def page_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (what Chromium's ``--dump-dom`` prints)."""
    return _chromium(url, profile, "--dump-dom").stdout


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


def colour_pixels(path: Path, colour: tuple[int, int, int], tolerance: int = 24) -> int:
    """How many pixels are within ``tolerance`` (per channel) of ``colour``."""
    near = np.abs(pixels(path) - np.array(colour)).max(axis=2) <= tolerance
    return int(near.sum())
