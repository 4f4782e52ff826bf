"""The SQL history on SQLite and PostgreSQL: migrations, batched background writes, failure isolation."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from postroom.history import EventRow, HistoryWriter, MessageRow, Record, TicketRow, make_engine, migrate

BOX = "support@example.test"


def rec(number: int, event: str, **kw: object) -> Record:
    return Record(mailbox=BOX, number=number, event=event, at=1_700_000_000.0, **kw)  # type: ignore[arg-type]


def test_migrations_create_the_schema(db_url: str) -> None:
    migrate(db_url)
    migrate(db_url)  # a second run at start-up is a no-op
    engine = make_engine(db_url)
    names = set(inspect(engine).get_table_names())
    assert {"tickets", "messages", "events", "alembic_version"} <= names
    engine.dispose()


def test_writer_records_tickets_messages_events(db_url: str) -> None:
    migrate(db_url)
    engine = make_engine(db_url)
    writer = HistoryWriter(engine, batch_size=3)
    writer.start()
    writer.submit([rec(1, "opened", customer="alice@c", ticket_subject="Hello", message_id="m1@c", queue_id="Q1")])
    writer.submit([rec(1, "followup", owner="meier", state="open", message_id="m2@c", queue_id="Q2")])
    writer.submit([rec(2, "opened", customer="bob@c", message_id="m3@c", queue_id="Q3") for _ in range(1)])
    assert writer.flush()
    writer.close()
    with Session(engine) as s:
        t1 = s.scalars(select(TicketRow).where(TicketRow.number == 1)).one()
        assert (t1.customer, t1.subject, t1.owner, t1.state) == ("alice@c", "Hello", "meier", "open")
        msgs = s.scalars(select(MessageRow).where(MessageRow.ticket_id == t1.id).order_by(MessageRow.id)).all()
        assert [(m.message_id, m.queue_id) for m in msgs] == [("m1@c", "Q1"), ("m2@c", "Q2")]
        assert s.scalar(select(func.count()).select_from(EventRow)) == 3
        assert s.scalar(select(func.count()).select_from(TicketRow)) == 2
    engine.dispose()


def test_a_dead_database_loses_history_lines_not_the_thread(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # No migration: every write fails; the writer logs the queue ids and keeps serving.
    engine = make_engine(sqlite_url)
    writer = HistoryWriter(engine)
    writer.start()
    with caplog.at_level(logging.ERROR, logger="postroom.history"):
        writer.submit([rec(1, "opened", queue_id="QDEAD")])
        assert writer.flush()
    assert "QDEAD" in caplog.text
    migrate(sqlite_url)
    writer.submit([rec(1, "opened", queue_id="QLIVE", message_id="x@y")])
    assert writer.flush()
    writer.close()
    with Session(engine) as s:
        assert s.scalars(select(MessageRow.queue_id)).all() == ["QLIVE"]
