"""`famsearch ui`: serve the Streamlit search UI over the index and open it in the browser.

Private by default, reachable on purpose: it listens on 127.0.0.1 unless --address says otherwise, and an
address beyond this machine needs a password (--password-file or FAMSEARCH_PASSWORD, never a plain flag, which
would show in `ps`). The Streamlit child gets only a salted hash of it, in its environment (`ui.password`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import webbrowser
from pathlib import Path

from indexer.commands.common import add_flag, common_flags, settings_from
from retrieval.config import ENV_PREFIX
from retrieval.errors import UsageError
from ui import streamlit_flags
from ui.password import HASH_ENV, hash_password

PASSWORD_ENV = ENV_PREFIX + "PASSWORD"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="open the search UI in the browser")
    common_flags(p)
    add_flag(p, "--port", type=int, default=8501, help="port to serve on")
    add_flag(
        p,
        "--address",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only); any other than a loopback one "
        f"needs a password: --password-file or {PASSWORD_ENV}",
    )
    add_flag(
        p,
        "--password-file",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"file holding the password the UI asks for (its first line; or set {PASSWORD_ENV})",
    )
    add_flag(p, "--headless", action="store_true", help="do not open a browser window")
    p.set_defaults(run=run)


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def read_password(args: argparse.Namespace) -> str | None:
    """The password from --password-file (its first line) or FAMSEARCH_PASSWORD; None when neither is given."""
    if args.password_file is not None:
        try:
            lines = args.password_file.read_text().splitlines()
        except OSError as error:
            raise UsageError(f"--password-file {args.password_file}: {error.strerror or error}") from None
        password, source = (lines[0] if lines else ""), f"--password-file {args.password_file}"
    elif PASSWORD_ENV in os.environ:
        password, source = os.environ[PASSWORD_ENV], PASSWORD_ENV
    else:
        return None
    if not password:
        raise UsageError(f"{source}: the password is empty")
    return password


def child_env(args: argparse.Namespace, password: str | None) -> dict[str, str]:
    """The Streamlit child's environment: the home, and the password's hash only (no password, no file name)."""
    env = {**os.environ, ENV_PREFIX + "HOME": str(settings_from(args).home)}
    if args.db:
        env[ENV_PREFIX + "DB"] = args.db
    for name in (PASSWORD_ENV, ENV_PREFIX + "PASSWORD_FILE", HASH_ENV):
        env.pop(name, None)
    if password is not None:
        env[HASH_ENV] = hash_password(password)
    return env


def streamlit_command(args: argparse.Namespace) -> list[str]:
    app = Path(__file__).resolve().parents[2] / "ui" / "app.py"
    # Always headless for Streamlit itself: otherwise its first run asks for an e-mail address on
    # stdin, which hangs or fails under make, cron or CI. We open the browser ourselves instead.
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.address",
        args.address,
        "--server.port",
        str(args.port),
        "--browser.gatherUsageStats",
        "false",
        "--server.headless",
        "true",
        "--client.toolbarMode",
        "minimal",  # no "Deploy" button on a local tool
        *streamlit_flags(),
    ]


def wait_for(child: subprocess.Popen) -> int:
    """Wait for the child; SIGTERM or SIGINT to us stops it (a second one kills it). Its exit code, 128 + N for
    a child ended by signal N as a shell reports it."""
    signals_seen = []

    def stop(signum: int, frame: object) -> None:
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            child.terminate()
        else:
            child.kill()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()  # resumed after each handler (PEP 475) until the child is gone
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child.poll() is None:  # only on an error of our own: leave no server behind
            child.kill()
            child.wait()
    return code if code >= 0 else 128 - code


def run(args: argparse.Namespace) -> int:
    password = read_password(args)
    if password is None and not is_loopback(args.address):
        raise UsageError(
            f"--address {args.address} serves the UI beyond this machine: give it a password with "
            f"--password-file FILE or {PASSWORD_ENV}, or leave --address at 127.0.0.1"
        )
    host = f"[{args.address}]" if ":" in args.address else args.address  # an IPv6 literal
    url = f"http://{host}:{args.port}"
    opener = threading.Timer(3.0, webbrowser.open, args=(url,))  # a no-op where there is no browser
    opener.daemon = True
    print(f"famsearch UI on {url} (Ctrl+C to stop)", flush=True)
    child = subprocess.Popen(streamlit_command(args), env=child_env(args, password))
    if not args.headless:
        opener.start()
    try:
        return wait_for(child)
    finally:
        opener.cancel()  # the server is gone: open nothing
