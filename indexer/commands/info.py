"""`famsearch info`: what is indexed, with which model and index type; the files that failed and why."""

from __future__ import annotations

import argparse
import json

from indexer.commands.common import EXIT_OK, add_flag, common_flags, require_index, settings_from

_STATE_NOTE = {  # why `vectors` counts the rows rather than the index file (searches rebuild it from them meanwhile)
    "stale": " (the index file lags the rows: a run did not finish; the next famsearch index rewrites it)",
    "damaged": " (the index or head file is damaged; the next famsearch index rebuilds it from the rows)",
    "missing": " (the index or head file is missing; the next famsearch index rebuilds it from the rows)",
}


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
        f"vectors    {info['vectors']} in a {info['index_type']} index{_STATE_NOTE.get(info['index_state'], '')}\n"
        f"model      {model.get('backbone')} ({model.get('weights_sha256')}), {model.get('pooling')}, "
        f"{model.get('input_size')}px, {model.get('precision', 'fp32')}, head {model.get('head')}"
    )
    if info["last_run"]:
        print(f"last run   {info['last_run'].get('finished_at')}")
    for failure in info.get("failures", []):
        print(f"failed     {failure['path']}: {failure['error']}")
    return EXIT_OK
