"""What a home holds, read without loading the model: `famsearch info --json` and the API's GET /status."""

from __future__ import annotations

from retrieval.config import Settings, index_generation
from retrieval.search import index_type_of
from retrieval.statefiles import damaged_files, load_intact_index
from retrieval.store import open_store


def home_status(settings: Settings, failures: bool = False) -> dict:
    """``{"images", "failed", "vectors", "model", "index_type", "index_state", "last_run", "home"}`` (docs/DESIGN.md
    §5), plus ``"failures": [{"path", "error"}]`` when asked. The caller checks that the home has a database first.

    ``vectors`` is what a search uses: the index file's count when the file is intact and current, else the
    indexed rows (searches then rebuild the index from them in memory). ``index_state`` says which:
    ok, stale (a run did not finish, or the file lags the rows), damaged or missing (the next index run
    writes the file again)."""
    store = open_store(settings.database_url)
    try:
        counts = store.counts()
        metas = store.get_metas(("model", "index", "last_run"))
        index_meta = metas.get("index") or {}
        index_file = settings.index_file(index_generation(index_meta))
        index = load_intact_index(index_file, index_meta)
        state = _index_state(settings, index_meta, metas.get("model"), index, counts["images"])
        status = {
            **counts,
            "vectors": int(index.ntotal) if state == "ok" else counts["images"],
            "model": metas.get("model"),
            "index_type": index_type_of(index) if index is not None else None,
            "index_state": state,
            "last_run": metas.get("last_run"),
            "home": str(settings.home),
        }
        if failures:
            status["failures"] = store.failures()
    finally:
        store.close()
    return status


def _index_state(settings: Settings, index_meta: dict, model: dict | None, index, n_ok: int) -> str:
    if index_meta.get("dirty"):
        return "stale"
    if damaged_files(settings, index_meta, model):
        return "damaged" if settings.index_file(index_generation(index_meta)).exists() else "missing"
    if index is None:
        return "damaged"
    return "ok" if index.ntotal == n_ok else "stale"
