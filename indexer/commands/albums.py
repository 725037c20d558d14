"""`famsearch albums`: list albums, label indexed photos from sub-folder names or a labels file, delete an album."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from indexer.commands.common import EXIT_OK, add_flag, common_flags, require_index, settings_from
from retrieval.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "albums",
        help="label indexed photos into albums (the classes of classify)",
        description="List albums; label indexed photos from sub-folder names or a labels file.",
    )
    common_flags(p)
    add_flag(
        p,
        "--from-folders",
        type=Path,
        nargs="+",
        default=None,
        metavar="ROOT",
        help="each photo under ROOT goes to the album named by its first sub-folder",
    )
    add_flag(
        p,
        "--from-file",
        type=Path,
        default=None,
        metavar="FILE",
        help='CSV path,label or JSON lines {"path", "label"} (relative paths: from the file\'s folder)',
    )
    add_flag(p, "--delete", default=None, metavar="ALBUM", help="delete an album (its photos stay indexed)")
    add_flag(p, "--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from indexer.labels import label_gallery
    from retrieval.albums import delete_album, list_albums
    from retrieval.store import open_store

    settings = settings_from(args)
    require_index(settings)
    for root in args.from_folders or []:
        if not root.is_dir():
            raise UsageError(f"{root}: no such folder")
    store = open_store(settings.database_url, writer=True)
    try:
        changes = label_gallery(
            store, "folders" if args.from_folders else None, args.from_file, args.from_folders or []
        )
        if args.delete:
            changes["deleted"] = delete_album(store, args.delete)
        albums = list_albums(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps({**changes, "albums": [{"album": name, "images": n} for name, n in albums]}))
        return EXIT_OK
    for source, counts in changes.items():
        if source == "deleted":
            print(f"album {args.delete!r} {'deleted' if counts else 'not found'}")
        else:
            print(
                f"labelled {counts['labelled']} images into {counts['albums']} albums from {source}"
                + (f" ({counts['unknown']} paths not indexed)" if counts["unknown"] else "")
            )
    for name, n in albums:
        print(f"{n:>7}  {name}")
    if not albums:
        print(
            "no albums; label the gallery with: famsearch albums --from-folders PHOTO_FOLDER (or --from-file labels.csv)"
        )
    return EXIT_OK
