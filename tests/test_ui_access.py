"""Private by default, reachable on purpose: `famsearch ui`'s address and password rules, the login gate in front
of the UI, and the server stopping with the command that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from indexer.cli import main
from indexer.commands import ui as ui_command
from ui import login
from ui.password import HASH_ENV, hash_password, password_matches
from ui.serve import free_port

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")
ROOT = Path(__file__).resolve().parents[1]
SECRET = "correct horse"
PASSWORD_VARS = ("FAMSEARCH_PASSWORD", "FAMSEARCH_PASSWORD_FILE", "FAMSEARCH_ADDRESS", HASH_ENV)


# ---------------------------------------------------------------------------- the stored hash
def test_a_password_matches_only_its_own_salted_hash():
    stored = hash_password(SECRET, iterations=1000)
    assert password_matches(stored, SECRET)
    assert not password_matches(stored, SECRET + " ") and not password_matches(stored, "")
    assert hash_password(SECRET, iterations=1000) != stored  # a fresh salt each time
    assert SECRET not in stored
    with pytest.raises(ValueError, match=HASH_ENV):
        password_matches("sha256$" + SECRET, SECRET)


# ---------------------------------------------------------------------------- the command's rules
class FakeChild:
    """Stands in for the Streamlit server: records what it was started with, exits at once."""

    started: list[tuple[list[str], dict[str, str]]] = []

    def __init__(self, command: list[str], env: dict[str, str]):
        FakeChild.started.append((command, env))

    def wait(self) -> int:
        return 0

    def poll(self) -> int:
        return 0


@pytest.fixture
def started(monkeypatch) -> list[tuple[list[str], dict[str, str]]]:
    """`famsearch ui` with no server behind it: the (command, env) of each start."""
    for name in PASSWORD_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(FakeChild, "started", [])
    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    return FakeChild.started


def _ui(capsys, tmp_path: Path, *flags: str) -> tuple[int, str, str]:
    code = main(["ui", "--headless", "--home", str(tmp_path / "home"), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_ui_listens_on_this_machine_only_by_default(capsys, tmp_path, started):
    code, out, _ = _ui(capsys, tmp_path)
    assert code == 0 and "http://127.0.0.1:8501" in out
    [(command, env)] = started
    assert _flag(command, "--server.address") == "127.0.0.1" and _flag(command, "--server.port") == "8501"
    assert HASH_ENV not in env  # no password: the UI opens straight onto the search


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.168.1.20", "photos.example.org"])
def test_an_address_beyond_this_machine_without_a_password_is_refused(capsys, tmp_path, started, address):
    code, out, err = _ui(capsys, tmp_path, "--address", address)
    assert code == 2 and started == [] and out == ""
    assert err.count("\n") == 1 and f"--address {address}" in err and "--password-file" in err


@pytest.mark.parametrize(
    ("address", "url"),
    [("127.0.0.1", "http://127.0.0.1:8501"), ("127.0.1.1", "http://127.0.1.1:8501"), ("::1", "http://[::1]:8501")]
    + [("localhost", "http://localhost:8501")],
)
def test_any_loopback_address_needs_no_password_and_is_the_printed_url(capsys, tmp_path, started, address, url):
    code, out, _ = _ui(capsys, tmp_path, "--address", address)
    assert code == 0 and url in out and _flag(started[0][0], "--server.address") == address


def test_a_password_file_opens_any_address_and_only_its_hash_reaches_the_server(capsys, tmp_path, started):
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n")
    code, out, _ = _ui(capsys, tmp_path, "--address", "0.0.0.0", "--password-file", str(secret_file))
    assert code == 0 and "http://0.0.0.0:8501" in out
    [(command, env)] = started
    assert _flag(command, "--server.address") == "0.0.0.0"
    assert password_matches(env[HASH_ENV], SECRET)  # the first line, without its newline
    assert not any(SECRET in value for value in [*command, *env.values()])


def test_the_password_and_address_can_come_from_the_environment(capsys, tmp_path, started, monkeypatch):
    monkeypatch.setenv("FAMSEARCH_PASSWORD", SECRET)
    monkeypatch.setenv("FAMSEARCH_ADDRESS", "0.0.0.0")
    code, _, _ = _ui(capsys, tmp_path)
    [(command, env)] = started
    assert code == 0 and _flag(command, "--server.address") == "0.0.0.0"
    assert "FAMSEARCH_PASSWORD" not in env and password_matches(env[HASH_ENV], SECRET)


def test_a_password_on_the_command_line_or_an_empty_or_missing_one_is_refused(capsys, tmp_path, started):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for flags in (["--password", SECRET], ["--password-file", str(empty)], ["--password-file", str(tmp_path / "no")]):
        code, _, err = _ui(capsys, tmp_path, "--address", "0.0.0.0", *flags)
        assert code == 2 and err.strip(), flags
    assert started == []


def test_a_hash_in_our_own_environment_does_not_reach_an_open_ui(capsys, tmp_path, started, monkeypatch):
    monkeypatch.setenv(HASH_ENV, hash_password(SECRET, iterations=1000))
    assert _ui(capsys, tmp_path)[0] == 0
    assert HASH_ENV not in started[0][1]  # no password given to this command: the UI is open, as asked


def test_a_signal_to_the_command_stops_its_server_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGTERM)).start()
    started_at = time.monotonic()
    assert ui_command.wait_for(child) == 128 + signal.SIGTERM  # the child ended by the forwarded SIGTERM
    assert time.monotonic() - started_at < 30 and child.poll() is not None
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------- the login gate
def test_the_throttle_closes_the_door_after_three_wrong_passwords_and_doubles_the_wait():
    stored, throttle = hash_password(SECRET, iterations=1000), login.Throttle()
    assert throttle.attempt(stored, "a", 0.0) == ("wrong", 0.0)
    assert throttle.attempt(stored, "b", 0.0) == ("wrong", 0.0)
    assert throttle.attempt(stored, "c", 10.0) == ("wrong", 2.0)  # the third: 2 s
    assert throttle.attempt(stored, SECRET, 11.0) == ("wait", 1.0)  # unchecked while closed, even the right one
    assert throttle.attempt(stored, "d", 12.0) == ("wrong", 4.0)  # the fourth: 4 s
    assert throttle.attempt(stored, SECRET, 16.0) == ("ok", 0.0)
    assert throttle.failures == 0 and throttle.attempt(stored, "e", 16.0) == ("wrong", 0.0)


@pytest.fixture
def locked_app(monkeypatch):
    """The UI behind a password (as `famsearch ui --password-file` serves it), with a fresh throttle."""
    monkeypatch.setenv(HASH_ENV, hash_password(SECRET, iterations=1000))
    monkeypatch.setattr(login, "THROTTLE", login.Throttle())

    def app(home: Path) -> AppTest:
        monkeypatch.setenv("FAMSEARCH_HOME", str(home))
        monkeypatch.delenv("FAMSEARCH_DB", raising=False)
        return AppTest.from_file(APP, default_timeout=120).run()

    return app


def _log_in(at: AppTest, password: str) -> AppTest:
    at.text_input[0].input(password)
    return at.button[0].click().run()


def test_behind_a_password_the_page_shows_only_the_login_until_it_is_given(indexed, locked_app):
    at = locked_app(indexed)
    assert [t.value for t in at.title] == ["famsearch"] and not at.sidebar.children
    assert [w.label for w in at.text_input] == ["Password"] and len(at.selectbox) == len(at.radio) == 0
    at = _log_in(at, "guess")
    assert [e.value for e in at.error] == ["Wrong password."] and not at.exception
    assert [t.value for t in at.title] == ["famsearch"]
    at = _log_in(at, SECRET)
    assert [t.value for t in at.title] == ["Search by example photo"] and not at.error and not at.exception
    assert "Password" not in [w.label for w in at.text_input]
    assert at.session_state["logged_in"]
    assert [t.value for t in locked_app(indexed).title] == ["famsearch"]  # a new session logs in again


def test_wrong_passwords_are_throttled_across_sessions(indexed, locked_app, monkeypatch):
    # The clock stands still, so a slow machine cannot let the 2 s wait run out between the two sessions.
    monkeypatch.setattr(login, "clock", lambda: 1000.0)
    at = locked_app(indexed)
    for _ in range(3):
        at = _log_in(at, "guess")
    assert at.error[0].value == "Wrong password. Try again in 2 s."
    at = _log_in(locked_app(indexed), SECRET)  # a new session: the same closed door, the right password unheard
    assert at.error[0].value.startswith("Too many wrong passwords. Try again in")
    assert [t.value for t in at.title] == ["famsearch"]


# ---------------------------------------------------------------------------- the real server
def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
            return response.read().strip() == b"ok"
    except OSError:
        return False


def _listening(port: int) -> list[str]:
    """The local addresses of the sockets listening on ``port`` (Linux's /proc/net/tcp{,6}), as hex."""
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    addresses.append(address)
    return addresses


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc/*/stat; the name in field 2 may hold spaces)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_famsearch_ui_serves_on_loopback_only_and_a_signal_stops_its_server(tmp_path, monkeypatch, signum):
    for name in PASSWORD_VARS:
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    command = [sys.executable, "-m", "indexer.cli", "ui", "--headless", "--home", str(tmp_path / "home")]
    with open(tmp_path / "ui.log", "wb") as log:
        parent = subprocess.Popen(
            [*command, "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while not _healthy(f"http://127.0.0.1:{port}"):
            assert parent.poll() is None and time.monotonic() < deadline, (tmp_path / "ui.log").read_text()
            time.sleep(0.25)
        assert _listening(port) == ["0100007F"]  # 127.0.0.1 only: not 0.0.0.0, not ::
        [server] = _children(parent.pid)
        parent.send_signal(signum)
        assert parent.wait(timeout=30) in (0, 128 + signum)
        assert not _alive(server) and _listening(port) == [] and not _healthy(f"http://127.0.0.1:{port}")
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()


def test_famsearch_ui_runs_the_script_with_streamlit_s_magic_off(capsys, tmp_path, started):
    """tests/test_ui_script.py says why."""
    code, _, _ = _ui(capsys, tmp_path)
    [(command, _)] = started
    assert code == 0 and _flag(command, "--runner.magicEnabled") == "false"
