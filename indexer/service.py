"""The HTTP API that `famsearch api` serves (FastAPI): search, explain, the indexed photos and the home's status.

The routes answer what the CLI's `--json` prints (docs/DESIGN.md §5), with the maps drawn as base64 PNG
overlays instead of .npy files. Every route but GET /health needs a live key (`famsearch api-key create`),
sent as ``x-api-key: KEY`` or ``Authorization: Bearer KEY``. Errors are ``{"detail": "one line"}``: 401 no or
bad key, 404 no such indexed photo, 413 an upload over `MAX_UPLOAD_MB`, 422 bad arguments or an upload that is
not a photo, 503 nothing indexed (or indexed by another model) in this home.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Query, Request, Security, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image

from indexer.commands.search import result_rows, search_record
from retrieval.apikeys import key_is_valid
from retrieval.boxes import Auto, Box, fit_box, parse_box
from retrieval.config import (
    DEFAULT_EXPLAINER,
    EXPLAINER_NAMES,
    MAX_UPLOAD_MB,
    MAX_UPLOAD_MEGAPIXELS,
    QUERY_THREADS,
    Settings,
    default_rerank,
    home_has_index,
    index_generation,
)
from retrieval.engine import QueryEngine, QueryResult
from retrieval.errors import FamsearchError, ImageError, IndexMissingError, ModelMismatchError
from retrieval.images import decode_image, overlay, read_indexed_photo
from retrieval.schema import STATUS_OK
from retrieval.status import home_status
from retrieval.store import Store, open_store, read_meta

OVERLAY_SIDE = 1024  # overlays are drawn at most this large (the UI's DISPLAY_SIDE)
THUMBNAIL_SIDE = 256
MAX_K = 100  # each match carries two PNG overlays: a bound on one request's work and answer
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
# A body this large cannot hold the files of any route (two photos for /explain), so it is refused unread.
MAX_BODY_BYTES = 2 * MAX_UPLOAD_BYTES + 1024 * 1024
UNAVAILABLE = (IndexMissingError, ModelMismatchError)  # states of the home, fixed by (re-)indexing: 503


class Backend:
    """What the routes of one process share: the database (keys, photos) and the engine, each opened on first
    use. The engine answers one request at a time, and is reopened once a re-index commits a new generation."""

    def __init__(self, settings: Settings, device: str | None = None):
        self.settings, self.device = settings, device
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        self._engine: QueryEngine | None = None
        self._engine_lock = threading.Lock()

    def store(self) -> Store | None:
        """The home's database, None while it has none (then no key is valid and nothing is indexed)."""
        with self._store_lock:
            if self._store is None and home_has_index(self.settings):
                self._store = open_store(self.settings.database_url)
            return self._store

    @contextmanager
    def engine(self) -> Iterator[QueryEngine]:
        """The loaded engine, held by this request alone; IndexMissingError while nothing is indexed."""
        with self._engine_lock:
            generation = index_generation(read_meta(self.settings.database_url, "index"))
            if self._engine is not None and index_generation(self._engine.index_info) != generation:
                self._engine.close()
                self._engine = None
            if self._engine is None:
                self._engine = QueryEngine(self.settings, device=self.device, threads=QUERY_THREADS)
            yield self._engine

    def key_is_valid(self, key: str) -> bool:
        store = self.store()
        return store is not None and key_is_valid(store, key)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if self._store is not None:
            self._store.close()


_KEY_HEADER = APIKeyHeader(name="x-api-key", auto_error=False, description="a key from famsearch api-key create")
_BEARER = HTTPBearer(auto_error=False, description="a key from famsearch api-key create")


def require_key(
    request: Request,
    header_key: Annotated[str | None, Security(_KEY_HEADER)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
) -> None:
    """401 unless the request carries a live key (x-api-key, or Authorization: Bearer)."""
    key = header_key or (bearer.credentials if bearer is not None else None)
    if not key or not _backend(request).key_is_valid(key):
        raise HTTPException(
            401,
            "a valid API key is needed: send x-api-key: KEY or Authorization: Bearer KEY "
            "(make one: famsearch api-key create --name NAME)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _backend(request: Request) -> Backend:
    return request.app.state.backend


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def drawn(image: Image.Image, heatmap: np.ndarray | None) -> str | None:
    """A raw (h, w) map as a base64 PNG overlay on the photo (at most OVERLAY_SIDE); None for no map."""
    if heatmap is None:
        return None
    image = image.copy()
    image.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE))
    return png_base64(overlay(image, heatmap))


def read_upload(upload: UploadFile) -> bytes:
    """The uploaded file's bytes; 413 over MAX_UPLOAD_MB (read no further than one byte past it)."""
    data = upload.file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"{upload.filename}: photos up to {MAX_UPLOAD_MB} MB can be uploaded")
    return data


def decode_photo(
    label: str, data: bytes, draft_size: int, max_megapixels: float
) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes decoded as the indexer decodes files (JPEGs in draft mode at ``draft_size``), and the photo's
    full-size (width, height); ImageError naming the photo."""
    try:
        return decode_image(data, max_megapixels, draft_size=draft_size)
    except ImageError as error:
        raise ImageError(f"{label}: not a readable image ({error})") from None


def indexed_photo(backend: Backend, image_id: int) -> tuple[Path, bytes]:
    """The path and bytes of an indexed photo (status ok), only while they are the bytes indexed
    (`read_indexed_photo`: not gone, not edited, not swapped for a link to another photo); 404 otherwise."""
    store = backend.store()
    rows = store.images_by_ids([image_id]) if store is not None else []
    if not rows or rows[0].status != STATUS_OK:
        raise HTTPException(404, f"no indexed photo has id {image_id}")
    try:
        return Path(rows[0].path), read_indexed_photo(rows[0].path, rows[0].size, rows[0].content_hash)
    except ImageError as error:
        raise HTTPException(404, f"indexed photo {image_id}: {error}") from None


def search_overlays(
    backend: Backend, result: QueryResult, rows: list[dict], query: bytes, label: str, max_megapixels: float
) -> None:
    """Each row's query and match overlays (base64 PNG) in place; the query photo decoded once at display size.
    A match whose file is gone or changed since it was indexed gets no match overlay (null)."""
    shown = None
    for match, row in zip(result.matches, rows):
        if match.match_map is None:
            row["query_overlay"] = row["match_overlay"] = None
            continue
        if shown is None:
            shown = decode_photo(label, query, OVERLAY_SIDE, max_megapixels)[0]
        row["query_overlay"] = drawn(shown, match.query_map)
        try:
            photo = decode_image(indexed_photo(backend, match.image_id)[1], draft_size=OVERLAY_SIDE)[0]
        except (HTTPException, ImageError):
            row["match_overlay"] = None
            continue
        row["match_overlay"] = drawn(photo, match.match_map)


router = APIRouter(dependencies=[Security(require_key)])


@router.post("/search")
def search(
    request: Request,
    file: Annotated[UploadFile | None, File(description="a query photo")] = None,
    image_id: Annotated[int | None, Form(description="or the id of an indexed photo")] = None,
    image_id_q: Annotated[int | None, Query(alias="image_id", include_in_schema=False)] = None,
    k: Annotated[int | None, Form(ge=1, le=MAX_K, description="matches (default 10)")] = None,
    k_q: Annotated[int | None, Query(alias="k", ge=1, le=MAX_K, include_in_schema=False)] = None,
    explainer: Annotated[str | None, Form(description=f"{', '.join(EXPLAINER_NAMES)} or none")] = None,
    explainer_q: Annotated[str | None, Query(alias="explainer", include_in_schema=False)] = None,
    box: Annotated[str | None, Form(description="X1,Y1,X2,Y2 (pixels of the photo) or auto")] = None,
    box_q: Annotated[str | None, Query(alias="box", include_in_schema=False)] = None,
) -> dict:
    """The top-k indexed photos most like a photo (upload `file`, or `image_id`): `famsearch search --json`'s
    record, with each match's maps as base64 PNG overlays (`query_overlay`, `match_overlay`). Every field can
    also be a query parameter."""
    backend = _backend(request)
    image_id = image_id if image_id is not None else image_id_q
    explainer = explainer or explainer_q or DEFAULT_EXPLAINER
    box_text = box or box_q
    if (file is None) == (image_id is None):
        raise HTTPException(422, "send either a photo (multipart field file) or image_id, not both")
    if explainer not in (*EXPLAINER_NAMES, "none"):
        raise HTTPException(422, f"unknown explainer {explainer!r}; choose one of {', '.join(EXPLAINER_NAMES)}, none")
    region = parse_box(box_text) if box_text else None
    if file is not None:
        label, data, cap = file.filename or "upload", read_upload(file), MAX_UPLOAD_MEGAPIXELS
    else:
        assert image_id is not None
        path, data = indexed_photo(backend, image_id)
        label, cap = str(path), float("inf")  # vetted by the indexer
    with backend.engine() as engine:
        image, size = decode_photo(label, data, engine.encoder.input_size, cap)
        image_box: Box | Auto | None = fit_box(region, size, image.size) if region is not None else None
        rerank = default_rerank()
        result = engine.query(image, k or k_q or 10, explainer, "none", image_box, rerank=rerank)
        model = engine.model
    rows = result_rows(result, None)
    search_overlays(backend, result, rows, data, label, cap)
    return search_record(label, model, result, rows, region, rerank)


@router.post("/explain")
def explain(
    request: Request,
    query: Annotated[UploadFile, File(description="the first photo")],
    match: Annotated[UploadFile, File(description="the second photo")],
    explainer: Annotated[str | None, Form(description=", ".join(EXPLAINER_NAMES))] = None,
    explainer_q: Annotated[str | None, Query(alias="explainer", include_in_schema=False)] = None,
) -> dict:
    """Any two photos compared, indexed or not: `famsearch explain --json`'s record, the maps as base64 PNG
    overlays (`query_overlay`, `match_overlay`)."""
    explainer = explainer or explainer_q or DEFAULT_EXPLAINER
    if explainer not in EXPLAINER_NAMES:
        raise HTTPException(422, f"unknown explainer {explainer!r}; choose one of {', '.join(EXPLAINER_NAMES)}")
    uploads = [(upload.filename or name, read_upload(upload)) for name, upload in (("query", query), ("match", match))]
    photos = [decode_photo(label, data, OVERLAY_SIDE, MAX_UPLOAD_MEGAPIXELS)[0] for label, data in uploads]
    with _backend(request).engine() as engine:
        report = engine.compare(photos[0], photos[1], explainer)
    return {
        "score": report.score,
        "explainer": explainer,
        "query_map": None,
        "match_map": None,
        "offset": {"query": report.offsets["first"], "match": report.offsets["second"]},
        "map_shape": {"query": list(report.first_map.shape), "match": list(report.second_map.shape)},
        "query_overlay": drawn(photos[0], report.first_map),
        "match_overlay": drawn(photos[1], report.second_map),
    }


@router.get("/images/{image_id}", response_class=Response)
def image_file(request: Request, image_id: int) -> Response:
    """The file of an indexed photo, as it was indexed (404 once it is gone or changed)."""
    path, data = indexed_photo(_backend(request), image_id)
    return Response(data, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")


@router.get("/images/{image_id}/thumbnail", response_class=Response)
def thumbnail(request: Request, image_id: int) -> Response:
    """An indexed photo as a JPEG at most THUMBNAIL_SIDE pixels on its longer side, upright."""
    image = decode_image(indexed_photo(_backend(request), image_id)[1], draft_size=THUMBNAIL_SIDE)[0]
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return Response(buffer.getvalue(), media_type="image/jpeg")


@router.get("/status")
def status(request: Request, failures: bool = False) -> dict:
    """`famsearch info --json`: counts, model, index type, last run, home (`failures`: the failed files too)."""
    settings = _backend(request).settings
    if not home_has_index(settings):
        raise IndexMissingError(settings.home)
    return home_status(settings, failures)


def create_app(settings: Settings, device: str | None = None) -> FastAPI:
    """The API over one home; the model is loaded by the first request that needs it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.backend.close()

    app = FastAPI(
        title="famsearch",
        summary="Search a photo collection by example image and see why each match came back.",
        lifespan=lifespan,
    )
    app.state.backend = Backend(settings, device)

    @app.get("/health")
    def health() -> dict:
        """Up (no key needed; says nothing about the index)."""
        return {"status": "ok"}

    @app.middleware("http")
    async def refuse_huge_bodies(request: Request, call_next):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse({"detail": f"photos up to {MAX_UPLOAD_MB} MB can be uploaded"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(FamsearchError)
    async def famsearch_error(request: Request, error: FamsearchError) -> JSONResponse:
        code = 503 if isinstance(error, UNAVAILABLE) else 422
        return JSONResponse({"detail": str(error)}, status_code=code)

    app.include_router(router)
    return app
