"""`famsearch info`: what is indexed, with which model and index type; the files that failed and why."""

from __future__ import annotations

import argparse
import json

from indexer.commands.common import EXIT_OK, add_flag, common_flags, require_index, settings_from
from retrieval.config import index_generation


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what is indexed, with which model; failures")
    common_flags(p)
    add_flag(p, "--failures", action="store_true", help="list the files that failed and why")
    add_flag(p, "--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from retrieval.search import index_type_of, load_index
    from retrieval.store import open_store

    settings = settings_from(args)
    require_index(settings)
    store = open_store(settings.database_url)
    try:
        counts = store.counts()
        index_file = settings.index_file(index_generation(store.get_meta("index")))
        index = load_index(index_file) if index_file.exists() else None
        info = {
            **counts,
            "vectors": int(index.ntotal) if index is not None else 0,
            "model": store.get_meta("model"),
            "index_type": index_type_of(index) if index is not None else None,
            "last_run": store.get_meta("last_run"),
            "home": str(settings.home),
        }
        if args.failures:
            info["failures"] = store.failures()
    finally:
        store.close()
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
