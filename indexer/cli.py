"""`famsearch`: index photo folders, search by example image, explain matches, open the UI.

This module only builds the parser from the subcommand modules (`indexer.commands`) and dispatches.
Every flag has an environment twin FAMSEARCH_<FLAG> (e.g. --batch-size -> FAMSEARCH_BATCH_SIZE).
Exit codes: 0 ok, 1 partial (some files failed), 2 usage error or a damaged state (one line on stderr), 70
internal error (a bug: reported with its traceback), 75 another `famsearch index` holds the home (try again
later), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from indexer.commands import COMMANDS
from indexer.commands.common import EXIT_BUG, EXIT_BUSY, EXIT_USAGE
from retrieval.errors import FamsearchError, HomeBusyError

LOGGER = logging.getLogger("famsearch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="famsearch",
        description="Search photos by example image and see why each match came back.",
        epilog="Every flag has an environment twin: FAMSEARCH_<FLAG>, e.g. FAMSEARCH_HOME.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"indexer.commands.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()  # reads the FAMSEARCH_* twins: a bad one is a usage error too
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its one-line usage error
        return int(exit_.code or 0)
    except FamsearchError as error:
        print(f"famsearch: {error}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted; committed work is kept, run the same command again to finish", file=sys.stderr)
        return 130
    except HomeBusyError as error:  # another index run holds the home: nothing done, try again later
        print(f"famsearch {args.command}: {error}", file=sys.stderr)
        return EXIT_BUSY
    except FamsearchError as error:  # a user's mistake or a state they can fix: one line
        print(f"famsearch {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # a bug: keep the traceback, and an exit code that is neither usage nor partial
        damage = _damaged_database(error, args)
        if damage:  # not a bug: the database file was damaged under us (found past open_store's check)
            print(f"famsearch {args.command}: {damage}", file=sys.stderr)
            return EXIT_USAGE
        LOGGER.exception("famsearch %s failed with an internal error (a bug; please report it)", args.command)
        return EXIT_BUG


def _damaged_database(error: Exception, args: argparse.Namespace) -> str | None:
    if "sqlalchemy" not in sys.modules or not hasattr(args, "home"):
        return None
    from indexer.commands.common import settings_from
    from retrieval.store import damage_message

    return damage_message(error, settings_from(args).database_url)


if __name__ == "__main__":
    sys.exit(main())
