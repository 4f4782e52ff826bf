"""The SQL history on SQLite and PostgreSQL: migrations, batched background writes, failure isolation."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import DateTime, delete, func, inspect, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom.history import HistoryWriter, make_engine, migrate, sqlite_text_time, write
from postroom.history_rows import EventRow, MessageRow, TicketRow
from postroom.spool import Spool
from postroom.tickets import Record

BOX = "support@example.test"


def rec(number: int, event: str, at: float = 1_700_000_000.0, **kw: object) -> Record:
    return Record(mailbox=BOX, number=number, event=event, at=at, **kw)  # type: ignore[arg-type]


def test_migrations_create_the_schema(db_url: str) -> None:
    migrate(db_url)
    migrate(db_url)  # a second run at start-up is a no-op
    engine = make_engine(db_url)
    names = set(inspect(engine).get_table_names())
    assert {"tickets", "messages", "events", "alembic_version"} <= names
    engine.dispose()


def test_writer_records_tickets_messages_events(db_url: str, tmp_path: Path) -> None:
    migrate(db_url)
    engine = make_engine(db_url)
    writer = HistoryWriter(engine, Spool(tmp_path / "spool", 1 << 20), batch_size=3)
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


def test_a_dead_database_delays_history_and_loses_none(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No migration: every write fails; the records wait in the spool, in order, until the database works.
    engine = make_engine(sqlite_url)
    writer = HistoryWriter(engine, Spool(tmp_path / "spool", 1 << 20), max_backoff=0.2)
    writer.start()
    with caplog.at_level(logging.WARNING, logger="postroom.history"):
        writer.submit([rec(1, "opened", queue_id="Q1", message_id="a@c", customer="alice@c")])
        writer.submit([rec(1, "followup", queue_id="Q2", message_id="b@c", owner="meier", state="open")])
        assert not writer.flush(timeout=1.0)
        assert "history: database unavailable" in caplog.text
        migrate(sqlite_url)
        assert writer.flush(timeout=10.0)
        assert "history: database back" in caplog.text
    writer.close()
    with Session(engine) as s:
        assert s.scalars(select(MessageRow.queue_id).order_by(MessageRow.id)).all() == ["Q1", "Q2"]
        assert s.scalars(select(TicketRow.owner)).all() == ["meier"]
    assert list((tmp_path / "spool").iterdir()) == []  # all sent: nothing left behind
    engine.dispose()


Rows = list[tuple[object, ...]]


def _history_rows(engine: Engine) -> tuple[Rows, Rows, Rows]:
    """Every row, with ticket ids replaced by (mailbox, number), in insertion order."""
    with Session(engine) as s:
        tickets = {t.id: t for t in s.scalars(select(TicketRow).order_by(TicketRow.id))}

        def key(ticket_id: int) -> tuple[str, int]:
            return tickets[ticket_id].mailbox, tickets[ticket_id].number

        ticket_rows: Rows = [
            (t.mailbox, t.number, t.customer, t.subject, t.owner, t.state, t.priority, t.linked, t.created_at,
             t.updated_at)
            for t in tickets.values()
        ]  # fmt: skip
        message_rows: Rows = [
            (key(m.ticket_id), m.message_id, m.direction, m.queue_id, m.from_addr, m.subject, m.at)
            for m in s.scalars(select(MessageRow).order_by(MessageRow.id))
        ]
        event_rows: Rows = [
            (key(e.ticket_id), e.kind, e.actor, e.detail, e.at)
            for e in s.scalars(select(EventRow).order_by(EventRow.id))
        ]
    return ticket_rows, message_rows, event_rows


def test_one_batch_writes_what_the_records_one_by_one_write(db_url: str) -> None:
    """A ticket opened and followed up in one batch, and one that an earlier batch opened, end the same."""
    earlier = [rec(7, "opened", customer="old@c", ticket_subject="Old", message_id="o1@c", queue_id="Q0")]
    batch = [
        rec(1, "opened", customer="alice@c", ticket_subject="Hello", message_id="m1@c", queue_id="Q1"),
        rec(7, "followup", owner="meier", state="open", message_id="o2@c", queue_id="Q2", at=1_700_000_100.0),
        rec(1, "followup", owner="meier", state="open", priority="high", message_id="m2@c", queue_id="Q3"),
        rec(2, "linked", customer="bob@c", linked=1, message_id="m3@c", queue_id="Q4"),
        rec(1, "assign", owner="mueller", state="open", priority="high", actor="admin", detail="mueller (was meier)"),
        rec(
            1,
            "reply",
            owner="mueller",
            state="pending",
            priority="high",
            direction="outbound",
            queue_id="Q5",
            at=1_700_000_200.0,
        ),
    ]
    migrate(db_url)
    engine = make_engine(db_url)
    with Session(engine) as s, s.begin():
        write(s, earlier)
    with Session(engine) as s, s.begin():
        write(s, batch)
    batched = _history_rows(engine)
    with Session(engine) as s, s.begin():
        for table in (EventRow, MessageRow, TicketRow):
            s.execute(delete(table))
    for one in [*earlier, *batch]:
        with Session(engine) as s, s.begin():
            write(s, [one])
    assert _history_rows(engine) == batched
    tickets, messages, events = batched
    assert [t[1:2] + t[4:7] for t in tickets] == [
        (7, "meier", "open", "normal"),
        (1, "mueller", "pending", "high"),
        (2, "", "new", "normal"),
    ]
    assert [m[3] for m in messages] == ["Q0", "Q1", "Q2", "Q3", "Q4", "Q5"]
    assert [e[1] for e in events] == ["opened", "opened", "followup", "followup", "linked", "assign", "reply"]
    engine.dispose()


def test_times_read_back_as_written_and_comparable_in_sql(db_url: str) -> None:
    """What team leads query: times come back as the mail's time, and SQL orders and filters by them."""
    migrate(db_url)
    engine = make_engine(db_url)
    times = [1_700_000_000.0, 1_700_000_000.5, 1_700_003_600.123456, 1_800_000_000.0]
    with Session(engine) as s, s.begin():
        write(s, [rec(n + 1, "opened", at=at, message_id=f"m{n}@c", queue_id=f"Q{n}") for n, at in enumerate(times)])
    cut = datetime.fromtimestamp(1_700_000_000.25, UTC)
    with Session(engine) as s:
        read = [m.at for m in s.scalars(select(MessageRow).order_by(MessageRow.at))]
        later = s.scalars(select(EventRow.at).where(EventRow.at > cut).order_by(EventRow.at)).all()
        created = s.scalars(select(TicketRow.created_at).order_by(TicketRow.number)).all()
    as_utc = [t.replace(tzinfo=UTC) if t.tzinfo is None else t for t in read]
    assert [t.timestamp() for t in as_utc] == pytest.approx(times, abs=1e-6)
    assert len(later) == 3 and len(created) == 4
    engine.dispose()


@given(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False))
def test_sqlite_times_are_stored_as_sqlalchemy_stores_them(at: float) -> None:
    value = datetime.fromtimestamp(at, UTC)
    dialect = sqlite.dialect()
    process = DateTime(timezone=True).dialect_impl(dialect).bind_processor(dialect)
    assert process is not None
    assert sqlite_text_time(value) == process(value)


def test_flush_writes_at_once_without_waiting_out_the_linger(sqlite_url: str, tmp_path: Path) -> None:
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    writer = HistoryWriter(engine, Spool(tmp_path / "spool", 1 << 20), linger=60.0)
    writer.start()
    writer.submit([rec(1, "opened", queue_id="Q1", message_id="a@c")])
    writer.submit([rec(1, "followup", queue_id="Q2", message_id="b@c")])
    started = time.monotonic()
    assert writer.flush()
    assert time.monotonic() - started < 10
    with Session(engine) as s:
        assert s.scalars(select(MessageRow.queue_id).order_by(MessageRow.id)).all() == ["Q1", "Q2"]
    writer.submit([rec(2, "opened", queue_id="Q3", message_id="c@c")])
    writer.close()  # stopping writes what is queued, too
    with Session(engine) as s:
        assert s.scalars(select(MessageRow.queue_id).order_by(MessageRow.id)).all() == ["Q1", "Q2", "Q3"]
    engine.dispose()


def test_an_up_to_date_schema_is_checked_without_loading_alembic(tmp_path: Path) -> None:
    """The milter checks the schema at every start; Alembic (~9 MiB) is imported only to migrate."""
    url = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    check = (
        "import sys\nfrom postroom.history import current_revision, head_revision, migrate\n"
        f"migrate({url!r})\nprint(head_revision(), current_revision({url!r}), 'alembic' in sys.modules)\n"
    )
    first = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.split()
    again = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.split()
    assert first == ["0003", "0003", "True"]  # a new database: migrated with Alembic (0003: ticket tags)
    assert again == ["0003", "0003", "False"]
