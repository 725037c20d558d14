"""Alembic environment, run programmatically by ``retrieval.store.migrate`` (no alembic.ini).

A caller that already holds a connection passes it in ``config.attributes["connection"]``
(Alembic cookbook: "Sharing a Connection across one or more programmatic migration
commands"); otherwise an engine is made from ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import Connection

from retrieval.schema import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs) -> None:
    # Batch mode lets later migrations ALTER tables on SQLite (copy-and-move).
    context.configure(target_metadata=target_metadata, render_as_batch=True, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with engine.connect() as connection:
        _run_on(connection)
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
