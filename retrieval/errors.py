"""The errors a shell reports to a person, as opposed to bugs.

Every kind is a ``FamsearchError``: the CLI prints it as one line and exits 2, the UI shows it in
place. Anything else that reaches a shell is a bug and keeps its traceback (the CLI exits 70,
``EX_SOFTWARE``). Each kind also subclasses ``ValueError``, so library callers that caught
``ValueError`` before these existed still do.
"""

from __future__ import annotations

from pathlib import Path


class FamsearchError(Exception):
    """A mistake or a state the user can fix; the message says how."""


class UsageError(FamsearchError, ValueError):
    """Bad arguments or a bad input file (dataset, labels, head, box): the message names what to change."""


class ImageError(FamsearchError, ValueError):
    """A file that cannot be read as a photo; the message says why, for `famsearch info --failures`."""


class IndexMissingError(FamsearchError, ValueError):
    """No usable index in this home: the shell should say how to build one."""

    def __init__(self, home: Path):
        super().__init__(f"nothing is indexed in {home}; run: famsearch index PHOTO_FOLDER --home {home}")


class ModelMismatchError(FamsearchError, ValueError):
    """The stored vectors were made by another model than the one asked for."""


class NoAlbumsError(FamsearchError, ValueError):
    """Classification asked for before any photo was put in an album."""

    def __init__(self) -> None:
        super().__init__("no albums yet; label the gallery first: famsearch albums --from-folders PHOTO_FOLDER")


class DamagedStateError(FamsearchError, ValueError):
    """A file in the home is damaged and cannot be rebuilt from what is left: the message says which and what to do."""


class HomeBusyError(FamsearchError):
    """Another run is writing to this home (`famsearch index` holds its lock): try again once it has finished."""
