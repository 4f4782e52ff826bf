"""Alembic environment: runs postroom's migrations against the URL the caller sets (see history.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from postroom.history import Base

target_metadata = Base.metadata


def run() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url, "history.migrate sets sqlalchemy.url"
    engine = create_engine(url)
    with engine.connect() as connection:
        # SQLite cannot ALTER most things in place; batch mode makes later migrations portable.
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
