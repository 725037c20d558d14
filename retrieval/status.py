"""What a home holds, read without loading the model: `famsearch info --json` and the API's GET /status."""

from __future__ import annotations

from retrieval.config import Settings, index_generation
from retrieval.search import index_type_of, load_index
from retrieval.store import open_store


def home_status(settings: Settings, failures: bool = False) -> dict:
    """``{"images", "failed", "vectors", "model", "index_type", "last_run", "home"}`` (docs/DESIGN.md §5), plus
    ``"failures": [{"path", "error"}]`` when asked. The caller checks that the home has a database first."""
    store = open_store(settings.database_url)
    try:
        index_file = settings.index_file(index_generation(store.get_meta("index")))
        index = load_index(index_file) if index_file.exists() else None
        status = {
            **store.counts(),
            "vectors": int(index.ntotal) if index is not None else 0,
            "model": store.get_meta("model"),
            "index_type": index_type_of(index) if index is not None else None,
            "last_run": store.get_meta("last_run"),
            "home": str(settings.home),
        }
        if failures:
            status["failures"] = store.failures()
    finally:
        store.close()
    return status
