"""Alembic environment: runs postroom's migrations against the URL the caller sets (see history.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from postroom.history import METADATA

target_metadata = METADATA
# The advisory lock key of postroom's migrations (any bigint; "postroom" in ASCII, so it is recognisable in
# pg_locks and does not clash with another application's lock by accident).
MIGRATION_LOCK = 0x706F7374726F6F6D


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
            if connection.dialect.name == "postgresql":
                # Two hosts upgrading at once (both started after a deploy, or `postroom db upgrade` run twice):
                # the second waits here until the first committed, then finds the schema at head and does
                # nothing.  Without the lock both create the same tables and one fails half-way.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            context.run_migrations()
    engine.dispose()


run()
