"""Search filters: which indexed photos a search may return (folder, date taken, camera) and a score cut-off.

The filter picks ids in the database (`matching_ids`); the index then finds the exact top-k among them
(`retrieval.search.filtered_search`), so a narrow filter still gets k results when it allows k photos.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import ColumnElement, func, or_, select

from retrieval.errors import UsageError
from retrieval.schema import STATUS_OK, Image
from retrieval.store import Store


@dataclass(frozen=True)
class SearchFilter:
    """Every field None: no filter. Days are inclusive: after=before=D keeps the photos taken on D."""

    folder: str | None = None  # absolute; photos in it or any sub-folder
    after: date | None = None
    before: date | None = None
    camera: str | None = None  # case-insensitive part of "make model"
    min_score: float | None = None

    @property
    def selects(self) -> bool:
        """Whether the filter narrows the photos searched (min_score only drops results afterwards)."""
        return any(value is not None for value in (self.folder, self.after, self.before, self.camera))

    def json(self) -> dict:
        """The filter as `search --json` states it (unset fields left out)."""
        values: dict[str, object] = {"in": self.folder, "after": self.after, "before": self.before}
        values.update(camera=self.camera, min_score=self.min_score)
        return {
            key: str(value) if isinstance(value, date) else value for key, value in values.items() if value is not None
        }


def parse_day(text: str, flag: str) -> date:
    """'YYYY-MM-DD' -> date; UsageError naming the flag otherwise."""
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give a day as YYYY-MM-DD, e.g. 2024-06-30") from None


def make_filter(
    folder: str | Path | None = None,
    after: str | date | None = None,
    before: str | date | None = None,
    camera: str | None = None,
    min_score: float | None = None,
) -> SearchFilter:
    """A checked filter from what a person typed (CLI flags, UI fields); UsageError on a bad value."""
    after = parse_day(after, "--after") if isinstance(after, str) else after
    before = parse_day(before, "--before") if isinstance(before, str) else before
    if after and before and after > before:
        raise UsageError(f"--after {after} is later than --before {before}: no day is both")
    if min_score is not None and not -1.0 <= min_score <= 1.0:
        raise UsageError(f"--min-score {min_score:g}: scores are cosines, between -1 and 1")
    if folder is not None:
        folder_path = Path(folder).expanduser()
        if not folder_path.is_dir():
            raise UsageError(f"--in {folder}: no such folder")
        folder = str(folder_path.absolute())
    return SearchFilter(folder, after, before, (camera or "").strip() or None, min_score)


def conditions(search_filter: SearchFilter) -> list[ColumnElement[bool]]:
    """The filter as WHERE clauses on the images table."""
    clauses: list[ColumnElement[bool]] = []
    if search_filter.folder is not None:
        folder = search_filter.folder.rstrip(os.sep) or os.sep
        inside = Image.folder.startswith(folder.rstrip(os.sep) + os.sep, autoescape=True)
        clauses.append(or_(Image.folder == folder, inside))
    if search_filter.after is not None:
        clauses.append(Image.taken_at >= datetime.combine(search_filter.after, time.min))
    if search_filter.before is not None:
        clauses.append(Image.taken_at < datetime.combine(search_filter.before + timedelta(days=1), time.min))
    if search_filter.camera is not None:
        camera = func.coalesce(Image.camera_make, "") + " " + func.coalesce(Image.camera_model, "")
        clauses.append(func.lower(camera).contains(search_filter.camera.lower(), autoescape=True))
    return clauses


def matching_ids(store: Store, search_filter: SearchFilter) -> np.ndarray:
    """Ids (int64, ascending) of the indexed photos the filter keeps."""
    stmt = select(Image.id).where(Image.status == STATUS_OK, *conditions(search_filter)).order_by(Image.id)
    with store.session() as session:
        return np.fromiter(session.scalars(stmt), dtype=np.int64)
