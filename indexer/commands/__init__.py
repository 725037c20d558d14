"""The `famsearch` subcommands: one module each, with its flags (`add_parser`) and its `run(args) -> exit code`;
a command's dashes are underscores in its module's name (`api-key` lives in `api_key.py`).

`indexer.cli` only builds the parser from these and dispatches; the modules import the heavy libraries
(torch, faiss, SQLAlchemy) inside `run`, so `--help` stays fast.
"""

from __future__ import annotations

# In the order `famsearch --help` lists them.
COMMANDS = (
    "index",
    "search",
    "explain",
    "duplicates",
    "eval",
    "info",
    "albums",
    "classify",
    "train",
    "ui",
    "api",
    "api-key",
)
