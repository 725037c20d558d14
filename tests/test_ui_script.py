"""The UI script runs with Streamlit's magic off wherever it runs: `famsearch ui`, `ui.serve` (browser tests,
bench) and the tests' in-process AppTest. Magic parses the script with `ast.parse`, and CPython 3.11 counts the
depth of every Python AST it builds in one counter shared by all threads (python/cpython#106905): a parse in another
thread at that moment (3.11 parses source lines to format a traceback) fails the script's compile with
"SystemError: AST constructor recursion depth mismatch", which made an AppTest flaky in the full suite."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
from streamlit.runtime.scriptrunner import magic
from streamlit.runtime.scriptrunner.script_cache import ScriptCache

from ui import STREAMLIT_OPTIONS, serve

APP = Path(__file__).resolve().parents[1] / "ui" / "app.py"


def test_compiling_the_app_as_streamlit_does_goes_around_magic_s_parse(monkeypatch):
    def add_magic(*args, **kwargs):
        raise AssertionError("magic parsed the app")

    monkeypatch.setattr(magic, "add_magic", add_magic)
    assert ScriptCache().get_bytecode(str(APP)) is not None


def test_the_app_draws_nothing_by_a_bare_expression_so_magic_has_nothing_to_do():
    """Magic would st.write each bare expression of the script; every one in ui/app.py is a call or a docstring."""
    tree = ast.parse(APP.read_text())
    bare = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and not isinstance(node.value, ast.Call)
        and not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str))
    ]
    assert bare == []


def test_the_served_ui_runs_with_magic_off(monkeypatch, tmp_path):
    commands = []

    class Exited:
        def __init__(self, command, **kwargs):
            commands.append(command)

        def poll(self):
            return 0

        def terminate(self):
            pass

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Exited)
    with pytest.raises(RuntimeError, match="did not come up"), serve.served(tmp_path / "home"):
        pass
    [command] = commands
    assert STREAMLIT_OPTIONS == {"runner.magicEnabled": False}
    assert command[command.index("--runner.magicEnabled") + 1] == "false"
