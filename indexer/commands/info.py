"""`famsearch info`: what is indexed, with which model and index type; the files that failed and why."""

from __future__ import annotations

import argparse
import json

from indexer.commands.common import EXIT_OK, add_flag, common_flags, require_index, settings_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what is indexed, with which model; failures")
    common_flags(p)
    add_flag(p, "--failures", action="store_true", help="list the files that failed and why")
    add_flag(p, "--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from retrieval.status import home_status

    settings = settings_from(args)
    require_index(settings)
    info = home_status(settings, failures=args.failures)
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    model = info["model"] or {}
    print(
        f"home       {info['home']}\nimages     {info['images']} indexed, {info['failed']} failed\n"
        f"vectors    {info['vectors']} in a {info['index_type']} index\n"
        f"model      {model.get('backbone')} ({model.get('weights_sha256')}), {model.get('pooling')}, "
        f"{model.get('input_size')}px, {model.get('precision', 'fp32')}, head {model.get('head')}"
    )
    if info["last_run"]:
        print(f"last run   {info['last_run'].get('finished_at')}")
    for failure in info.get("failures", []):
        print(f"failed     {failure['path']}: {failure['error']}")
    return EXIT_OK
