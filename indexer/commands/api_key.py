"""`famsearch api-key`: make, revoke and list the keys that `famsearch api` accepts (only their hashes are kept)."""

from __future__ import annotations

import argparse
import json

from indexer.commands.common import EXIT_OK, add_flag, common_flags, settings_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "api-key",
        help="keys for famsearch api",
        description="Make, revoke and list the keys that famsearch api accepts. A key is shown once, when made.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a key and print it (once: only its hash is kept)")
    add_flag(create, "--name", required=True, help="what the key is for (unique)")
    revoke = actions.add_parser("revoke", help="refuse a key from now on")
    add_flag(revoke, "--name", required=True, help="the key's name")
    listing = actions.add_parser("list", help="names, when made, when revoked (never the keys)")
    for action in (create, revoke, listing):
        common_flags(action)
        add_flag(action, "--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from retrieval.apikeys import create_key, list_keys, revoke_key
    from retrieval.store import open_store

    # No index needed: keys can be made before the first `famsearch index` (the database is made here then).
    store = open_store(settings_from(args).database_url, writer=True)
    try:
        if args.action == "create":
            key = create_key(store, args.name)
            print(json.dumps({"name": args.name, "key": key}) if args.json else key)
        elif args.action == "revoke":
            revoke_key(store, args.name)
            print(json.dumps({"name": args.name, "revoked": True}) if args.json else f"revoked {args.name}")
        else:
            keys = list_keys(store)
            lines = [_key_line(row) for row in keys] or [
                "no API keys yet; make one: famsearch api-key create --name NAME"
            ]
            print(json.dumps({"keys": keys}) if args.json else "\n".join(lines))
    finally:
        store.close()
    return EXIT_OK


def _key_line(row: dict) -> str:
    return f"{row['name']:<24} created {row['created']}  " + (f"revoked {row['revoked']}" if row["revoked"] else "live")
