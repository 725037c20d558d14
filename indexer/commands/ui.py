"""`famsearch ui`: serve the Streamlit search UI over the index and open it in the browser."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import webbrowser
from pathlib import Path

from indexer.commands.common import add_flag, common_flags, settings_from
from retrieval.config import ENV_PREFIX


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="open the search UI in the browser")
    common_flags(p)
    add_flag(p, "--port", type=int, default=8501, help="port to serve on")
    add_flag(p, "--headless", action="store_true", help="do not open a browser window")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    app = Path(__file__).resolve().parents[2] / "ui" / "app.py"
    env = {**os.environ, ENV_PREFIX + "HOME": str(settings_from(args).home)}
    if args.db:
        env[ENV_PREFIX + "DB"] = args.db
    # Always headless for Streamlit itself: otherwise its first run asks for an e-mail address on
    # stdin, which hangs or fails under make, cron or CI. We open the browser ourselves instead.
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.port",
        str(args.port),
        "--browser.gatherUsageStats",
        "false",
        "--server.headless",
        "true",
        "--client.toolbarMode",
        "minimal",
    ]  # no "Deploy" button on a local tool
    url = f"http://localhost:{args.port}"
    print(f"famsearch UI on {url} (Ctrl+C to stop)", flush=True)
    if not args.headless:
        threading.Timer(3.0, webbrowser.open, args=(url,)).start()  # a no-op where there is no browser
    return subprocess.call(command, env=env)
