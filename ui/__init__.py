"""The search UI: the Streamlit script `ui/app.py` and what it draws with."""

# Streamlit options for every run of ui/app.py: `famsearch ui`, `ui.serve` and the tests' in-process AppTest
# (tests/conftest.py). Magic off: the app draws nothing by a bare expression, and magic parses the script with
# ast.parse, whose AST building CPython 3.11 counts in one counter shared by all threads (python/cpython#106905):
# a parse in another thread at that moment fails the script's compile ("SystemError: AST constructor recursion
# depth mismatch").
STREAMLIT_OPTIONS = {"runner.magicEnabled": False}


def streamlit_flags() -> list[str]:
    """`STREAMLIT_OPTIONS` as `streamlit run` flags."""
    return [token for name, value in STREAMLIT_OPTIONS.items() for token in (f"--{name}", str(value).lower())]
