"""Why the UI runs with Streamlit's magic off (ui/__init__.py, tests/test_ui_script.py): compile ui/app.py as
Streamlit's script runner does, again and again, while another thread parses Python source and drops objects with
finalizers (as formatting a traceback in another thread does on CPython 3.11), and count the compiles that fail with
"SystemError: AST constructor recursion depth mismatch" (python/cpython#106905), magic on and off.

    .venv/bin/python experiments/probe_magic_race.py [--compiles N] [--switch-interval S]

Results: bench/results/magic-race.txt.
"""

from __future__ import annotations

import argparse
import ast
import sys
import threading
from pathlib import Path

from streamlit import config
from streamlit.runtime.scriptrunner.script_cache import ScriptCache

APP = Path(__file__).resolve().parents[1] / "ui" / "app.py"


class Finalised:
    """An object whose finalizer runs Python code, so the garbage collector can hand the GIL to another thread."""

    def __del__(self) -> None:
        sum(range(50))


def churn(source: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            ast.parse(source)
        except SystemError:
            pass
        a, b = Finalised(), Finalised()
        a.other, b.other = b, a  # a cycle: freed by the collector, mid-allocation elsewhere


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compiles", type=int, default=100)
    parser.add_argument("--switch-interval", type=float, default=1e-5, help="sys.setswitchinterval (s)")
    args = parser.parse_args()
    sys.setswitchinterval(args.switch_interval)
    stop = threading.Event()
    other = threading.Thread(target=churn, args=(APP.read_text(), stop))
    other.start()
    try:
        for magic in (True, False):
            config.set_option("runner.magicEnabled", magic)
            failed = 0
            for _ in range(args.compiles):
                try:
                    ScriptCache().get_bytecode(str(APP))
                except SystemError:
                    failed += 1
            print(f"magic {'on' if magic else 'off'}: {failed} of {args.compiles} compiles failed with SystemError")
    finally:
        stop.set()
        other.join()
    print(f"Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
