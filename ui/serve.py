"""Serve the UI from a subprocess on a free localhost port (for the browser test and the latency bench)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from retrieval.config import ENV_PREFIX
from ui import streamlit_flags

APP = Path(__file__).resolve().parent / "app.py"
# Debian's chromium, headless, offline: no sandbox (CI runs as root), no GPU, no phoning home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
            return response.read().strip() == b"ok"
    except OSError:
        return False


@contextmanager
def served(
    home: Path, timeout_s: float = 120.0, log: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`streamlit run ui/app.py` on 127.0.0.1 over home; yields the URL once healthy, stops it after. ``env``:
    more variables for the server (e.g. `ui.password.HASH_ENV` to serve it behind the login)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    child_env = {**os.environ, ENV_PREFIX + "HOME": str(home)}
    child_env.pop(ENV_PREFIX + "DB", None)
    child_env.update(env or {})
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "minimal",
        *streamlit_flags(),
    ]
    with open(log or os.devnull, "wb") as sink:
        process = subprocess.Popen(command, env=child_env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while not _healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the UI server did not come up on {url} (exit code {process.poll()})")
                time.sleep(0.25)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
