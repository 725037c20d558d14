"""The Alembic migrations that make the schema (`retrieval.store`)."""

# The newest revision: a database at it opens without importing Alembic (`retrieval.store._at_head`, ~0.2 s of a
# cold `famsearch search`). A new migration moves it; tests/test_store.py checks it against Alembic's own heads.
HEAD = "0004"
