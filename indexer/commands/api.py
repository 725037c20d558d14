"""`famsearch api`: search, explain, the indexed photos and the home's status over HTTP, for scripts and apps.

The routes live in `indexer.service`; this only binds them (uvicorn). The OpenAPI page is at /docs.
"""

from __future__ import annotations

import argparse
import sys

from indexer.commands.common import EXIT_OK, add_flag, common_flags, settings_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "api",
        help="serve search and explain over HTTP (keys: famsearch api-key)",
        description="Serve the home over HTTP (FastAPI; the OpenAPI page is at /docs). Every route but "
        "GET /health needs a key from famsearch api-key create, sent as x-api-key or Authorization: Bearer.",
    )
    common_flags(p)
    add_flag(p, "--address", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    add_flag(p, "--port", type=int, default=8000, help="port to listen on")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from indexer.service import create_app

    settings = settings_from(args)
    print(f"famsearch api: http://{args.address}:{args.port} (OpenAPI page: /docs)", file=sys.stderr, flush=True)
    uvicorn.run(
        create_app(settings, args.device),
        host=args.address,
        port=args.port,
        log_level="info" if args.verbose else "warning",
    )
    return EXIT_OK
