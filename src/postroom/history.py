"""The durable history in SQL (SQLAlchemy 2): tickets, messages and events.

Redis answers the hot path; this is the durable record team leads query.  Mail threads never wait for SQL:
:class:`HistoryWriter` appends records to an on-disk spool (:mod:`postroom.spool`) and one background thread
writes them in batches, so a slow, stopped or frozen database delays history lines and loses none.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Index,
    Insert,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Update,
    bindparam,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from postroom.spool import Spool
from postroom.tickets import Record

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


log = logging.getLogger("postroom.history")


# The schema as SQLAlchemy Core tables: the history writer in the daemons needs no ORM (about 6 MiB less in every
# milter).  postroom.history_rows maps the ORM classes the admin commands query with onto these same tables, and
# the migrations in migrations/versions create them.
METADATA = MetaData()
_ID = BigInteger().with_variant(Integer, "sqlite")

TICKETS = Table(
    "tickets",
    METADATA,
    Column("id", _ID, primary_key=True),
    Column("mailbox", String(320), nullable=False),
    Column("number", Integer, nullable=False),
    Column("customer", String(320), nullable=False, default=""),
    Column("subject", Text, nullable=False, default=""),
    Column("owner", String(128), nullable=False, default=""),
    Column("state", String(32), nullable=False, default="new"),
    Column("priority", String(16), nullable=False, default="normal"),
    Column("linked", Integer, nullable=False, default=0),
    Column("tags", Text, nullable=False, default="", server_default=""),  # comma-separated, as in Redis
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("mailbox", "number", name="uq_tickets_mailbox_number"),
)

MESSAGES = Table(
    "messages",
    METADATA,
    Column("id", _ID, primary_key=True),
    Column("ticket_id", ForeignKey("tickets.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("message_id", String(998), nullable=False, default=""),
    Column("direction", String(16), nullable=False),  # inbound | outbound | note
    Column("queue_id", String(32), nullable=False, default=""),
    Column("from_addr", String(320), nullable=False, default=""),
    Column("subject", Text, nullable=False, default=""),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("ix_messages_message_id", "message_id"),
)

EVENTS = Table(
    "events",
    METADATA,
    Column("id", _ID, primary_key=True),
    Column("ticket_id", ForeignKey("tickets.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("kind", String(32), nullable=False),  # opened | followup | linked | ...
    Column("actor", String(320), nullable=False, default=""),
    Column("detail", Text, nullable=False, default=""),
    Column("at", DateTime(timezone=True), nullable=False),
    # The record's unique key: a record the spool delivers twice is stored once (NULL for rows older than it).
    Column("record_key", String(32), nullable=True, default=None),
    Index("ix_events_record_key", "record_key", unique=True),
)


def _ts(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def _ensure_sqlite_dir(url: str) -> None:
    # SQLite opens the file but will not make its folder; a fresh demo or test dir has none yet.
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        try:
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # The admin knows this folder as database.url: say so rather than only the errno's text.
            why = f"cannot create the folder of the SQLite database of database.url ({exc.strerror})"
            raise OSError(exc.errno, why, exc.filename) from None


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    # WAL: readers (postroom tickets, team leads' queries) never block the writer; NORMAL: a commit does not wait
    # for fsync (a power cut may lose the last history lines, never corrupt the file).
    cursor = dbapi_connection.cursor()
    try:
        # Switching a file to WAL needs it to itself for a moment; if another process holds it, a later
        # connection switches it (the mode is stored in the file) and this one works as the file is.
        with contextlib.suppress(sqlite3.OperationalError):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str) -> Engine:
    _ensure_sqlite_dir(url)
    if make_url(url).get_backend_name() == "sqlite":
        # A file database cannot go away under an open connection: no ping per checkout.
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # A frozen server must not hold a connection attempt forever (the spool keeps the records meanwhile).
    connect_args = {"connect_timeout": 10} if make_url(url).get_backend_name() == "postgresql" else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


_REVISION = re.compile(r"^(down_)?revision(?:\s*:[^=]*)?\s*=\s*(?:[\"']([^\"']*)[\"']|None)", re.MULTILINE)


def head_revision() -> str | None:
    """The newest revision of the shipped migrations, read from their files (None if that is not one)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (Path(__file__).parent / "migrations" / "versions").glob("*.py"):
        for down, value in _REVISION.findall(script.read_text()):
            if value:
                (parents if down else revisions).add(value)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def current_revision(url: str) -> str | None:
    """The database's Alembic revision, None for a database without one."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def migrate(url: str) -> tuple[str | None, str | None]:
    """Bring the schema to the newest Alembic revision; returns (revision before, revision now) for
    ``postroom db upgrade`` to say what it did.

    Alembic is imported only when there is something to migrate: a running milter then never holds it in memory
    (about 9 MiB) for a check that finds the schema up to date.
    """
    _ensure_sqlite_dir(url)
    head = head_revision()
    before = current_revision(url)
    if head is not None and before == head:
        return before, head
    from alembic import command  # noqa: PLC0415 -- lazily, see above
    from alembic.config import Config as AlembicConfig  # noqa: PLC0415

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")
    return before, current_revision(url)


_TICKETS = TICKETS
_MESSAGES = MESSAGES
_EVENTS = EVENTS
# Keys per SELECT of existing tickets: far below every back end's limit of bound parameters.
_LOOKUP_CHUNK = 500

_INSERT_TICKETS = insert(_TICKETS)
_INSERT_TICKETS_RETURNING = insert(_TICKETS).returning(_TICKETS.c.mailbox, _TICKETS.c.number, _TICKETS.c.id)
_INSERT_MESSAGES = insert(_MESSAGES)
_INSERT_EVENTS = insert(_EVENTS)
_UPDATE_TICKETS = (
    update(_TICKETS)
    .where(_TICKETS.c.id == bindparam("b_id"))
    .values(
        owner=bindparam("b_owner"),
        state=bindparam("b_state"),
        priority=bindparam("b_priority"),
        tags=bindparam("b_tags"),
        updated_at=bindparam("b_updated_at"),
    )
)

_Key = tuple[str, int]


def sqlite_text_time(value: datetime) -> str:
    """A UTC datetime as SQLAlchemy's SQLite DATETIME stores it ("2026-11-26 02:50:00.123456"), in one C call.

    tests/test_history.py checks it against SQLAlchemy's own bind processor.
    """
    return value.isoformat(" ", "microseconds")[:26]


@dataclass(frozen=True)
class _DriverStatement:
    """A statement compiled once for SQLite: its SQL, and how to turn a row dict into DBAPI parameters."""

    sql: str
    values: Callable[[dict[str, Any]], tuple[Any, ...]]  # the row's values in DBAPI order (one C call)
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]  # (position, bind processor) where one is needed


_driver_statements: dict[tuple[int, tuple[str, ...]], _DriverStatement] = {}


def _driver_statement(stmt: Insert | Update, dialect: Dialect, names: tuple[str, ...]) -> _DriverStatement:
    key = (id(stmt), names)
    found = _driver_statements.get(key)
    if found is None:
        compiled = stmt.compile(dialect=dialect, column_keys=list(names))
        order = tuple(compiled.positiontup or ())
        processors: list[tuple[int, Callable[[Any], Any]]] = []
        for position, name in enumerate(order):
            kind = compiled.binds[name].type
            process = (
                sqlite_text_time if isinstance(kind, DateTime) else kind.dialect_impl(dialect).bind_processor(dialect)
            )
            if process is not None:
                processors.append((position, process))
        getter = itemgetter(*order)
        values = getter if len(order) > 1 else lambda row: (getter(row),)
        found = _driver_statements[key] = _DriverStatement(compiled.string, values, tuple(processors))
    return found


def _on_sqlite(conn: Connection) -> bool:
    """Whether the history's SQLite paths (sqlite3 directly, qmark parameters) apply to this connection."""
    return conn.dialect.name == "sqlite" and conn.dialect.positional


def _execute_many(conn: Connection, stmt: Insert | Update, rows: list[dict[str, Any]]) -> None:
    """``conn.execute(stmt, rows)``, on SQLite straight through sqlite3's executemany.

    SQLAlchemy's per-row parameter handling costs several times what SQLite's own insert does, and the history
    thread holds Python's global lock while it runs, which the milter's mail threads then wait for: measured with
    bench/milter_direct.py, history writes cost the milter far more than their own CPU.  The values still go
    through each column type's bind processor, so SQLite stores exactly what SQLAlchemy would (datetimes as
    text); PostgreSQL keeps SQLAlchemy's batched multi-row inserts.
    """
    if not _on_sqlite(conn):
        conn.execute(stmt, rows)
        return
    ds = _driver_statement(stmt, conn.dialect, tuple(rows[0]))
    params: list[tuple[Any, ...]] = []
    for row in rows:
        values = ds.values(row)
        if ds.processors:
            mutable = list(values)
            for position, process in ds.processors:
                mutable[position] = process(mutable[position])
            values = tuple(mutable)
        params.append(values)
    conn.exec_driver_sql(ds.sql, params)


def _ticket_ids(conn: Connection, keys: Iterable[_Key]) -> dict[_Key, int]:
    """The row ids of those of these tickets that already exist."""
    wanted = list(keys)
    found: dict[_Key, int] = {}
    sqlite = _on_sqlite(conn)
    for start in range(0, len(wanted), _LOOKUP_CHUNK):
        chunk = wanted[start : start + _LOOKUP_CHUNK]
        keep = set(chunk)
        rows: Iterable[Any]
        if sqlite:
            # As in _execute_many: SQLAlchemy's expansion of the IN lists cost more than SQLite's query.  One
            # query per mailbox, so SQLite uses the (mailbox, number) index.
            by_box: dict[str, list[int]] = {}
            for box, n in chunk:
                by_box.setdefault(box, []).append(n)
            rows = [
                (box, number, row_id)
                for box, numbers in by_box.items()
                for number, row_id in conn.exec_driver_sql(
                    f"SELECT number, id FROM tickets WHERE mailbox = ? AND number IN ({', '.join('?' * len(numbers))})",
                    (box, *numbers),
                )
            ]
        else:
            rows = conn.execute(
                select(_TICKETS.c.mailbox, _TICKETS.c.number, _TICKETS.c.id).where(
                    _TICKETS.c.mailbox.in_({box for box, _ in chunk}), _TICKETS.c.number.in_({n for _, n in chunk})
                )
            )
        for mailbox, number, row_id in rows:
            if (mailbox, number) in keep:
                found[(mailbox, number)] = row_id
    return found


def write(session: Session | Connection, records: list[Record], *, maybe_stored: bool = True) -> None:
    """Apply records in order, in the session's (or connection's) transaction; a ticket row is created on its
    first record and updated after.  Records whose key the history holds are skipped (a replay stores nothing
    twice); ``maybe_stored=False`` says no attempt to store these records was ever made, which saves the look-up.

    The result is that of applying the records one by one: a new ticket's row takes customer, subject, link and
    creation time from its first record, and every ticket ends with owner, state, priority and update time of
    its last one.  A batch costs one look-up of the tickets it names and one multi-row statement per table.
    """
    conn = session if isinstance(session, Connection) else session.connection()
    if maybe_stored:
        records = _unseen(conn, records)
    if not records:
        return
    first: dict[_Key, Record] = {}
    last: dict[_Key, Record] = {}
    for rec in records:
        key = (rec.mailbox, rec.number)
        first.setdefault(key, rec)
        last[key] = rec
    ids = _ticket_ids(conn, first)
    known = [key for key in first if key in ids]
    fresh = [key for key in first if key not in ids]
    if fresh:
        ids.update(_insert_tickets(conn, [(first[key], last[key]) for key in fresh]))
    if known:
        _update_tickets(conn, [(ids[key], last[key]) for key in known])
    _insert_messages_and_events(conn, records, ids)


def _insert_tickets(conn: Connection, spans: list[tuple[Record, Record]]) -> dict[_Key, int]:
    """Rows for new tickets, each from its (first, last) record of the batch; their ids by (mailbox, number)."""
    rows = [
        {
            "mailbox": a.mailbox,
            "number": a.number,
            "customer": a.customer,
            "subject": a.ticket_subject,
            "linked": a.linked,
            "created_at": _ts(a.at),
            "owner": z.owner,
            "state": z.state,
            "priority": z.priority,
            "tags": z.tags,
            "updated_at": _ts(z.at),
        }
        for a, z in spans
    ]
    if conn.dialect.insert_executemany_returning and not _on_sqlite(conn):
        # Rows come back in any order, matched by their key (asking for parameter order would make
        # SQLAlchemy insert one row per statement where the back end has no sentinel to sort by).
        result = conn.execute(_INSERT_TICKETS_RETURNING, rows)
        return {(mailbox, number): row_id for mailbox, number, row_id in result}
    # sqlite3's executemany (and a back end without RETURNING) returns no rows: one SELECT reads the new ids back.
    _execute_many(conn, _INSERT_TICKETS, rows)
    return _ticket_ids(conn, [(a.mailbox, a.number) for a, _ in spans])


def _update_tickets(conn: Connection, latest: list[tuple[int, Record]]) -> None:
    """Owner, state, priority, tags and update time of known tickets, from each one's last record (with its row id)."""
    _execute_many(
        conn,
        _UPDATE_TICKETS,
        [
            {
                "b_id": row_id,
                "b_owner": rec.owner,
                "b_state": rec.state,
                "b_priority": rec.priority,
                "b_tags": rec.tags,
                "b_updated_at": _ts(rec.at),
            }
            for row_id, rec in latest
        ],
    )


def _insert_messages_and_events(conn: Connection, records: list[Record], ids: dict[_Key, int]) -> None:
    """One message row per record that names a mail, one event row per record."""
    messages = [
        {
            "ticket_id": ids[(rec.mailbox, rec.number)],
            "message_id": rec.message_id,
            "direction": rec.direction,
            "queue_id": rec.queue_id,
            "from_addr": rec.from_addr,
            "subject": rec.subject,
            "at": _ts(rec.at),
        }
        for rec in records
        if rec.direction and (rec.message_id or rec.queue_id)
    ]
    if messages:
        _execute_many(conn, _INSERT_MESSAGES, messages)
    events = [
        {
            "ticket_id": ids[(rec.mailbox, rec.number)],
            "kind": rec.event,
            "actor": rec.actor,
            "detail": rec.detail,
            "at": _ts(rec.at),
            "record_key": rec.key,
        }
        for rec in records
    ]
    _execute_many(conn, _INSERT_EVENTS, events)


def _unseen(conn: Connection, records: list[Record]) -> list[Record]:
    """The records whose key the history does not hold yet, each once: what makes a replay idempotent."""
    by_key = {rec.key: rec for rec in records}
    keys = list(by_key)
    for start in range(0, len(keys), _LOOKUP_CHUNK):
        chunk = keys[start : start + _LOOKUP_CHUNK]
        for (key,) in conn.execute(select(_EVENTS.c.record_key).where(_EVENTS.c.record_key.in_(chunk))):
            by_key.pop(key, None)
    return [rec for rec in records if by_key.pop(rec.key, None) is not None]


class HistoryWriter:
    """Mail threads append records to the on-disk :class:`~postroom.spool.Spool`; one thread sends them to SQL.

    After the first record of a batch the thread lingers up to ``linger`` seconds (or until ``batch_size``
    records) for more: one statement per table for many records costs far less CPU than one per record.  While
    the database is away the thread retries with a growing pause (up to ``max_backoff``), logging once when it
    goes and once when it is back; the records wait on disk, in order, and none is dropped.
    """

    def __init__(
        self, engine: Engine, spool: Spool, batch_size: int = 200, linger: float = 0.2, max_backoff: float = 10.0
    ) -> None:
        self._engine = engine
        self.spool = spool
        self._batch = batch_size
        self._linger = linger
        self._max_backoff = max_backoff
        self._thread = threading.Thread(target=self._run, name="postroom-history", daemon=True)
        self._wake = threading.Event()  # records were appended, or flush/close is waiting
        self._hurry = threading.Event()  # flush or close is waiting: stop lingering
        self._stop = threading.Event()
        self._drained = threading.Condition()
        self._failing_since = 0.0
        self._failures = 0  # failed attempts so far (flush stops waiting on a new one)
        # The last attempt did not end well: its records (read again from the same place) may have been stored all
        # the same (the commit reached the database, its answer did not reach us).
        self._unsure = False
        self._adopted_at = 0.0

    def start(self) -> None:
        self._thread.start()
        if self.spool.bytes_waiting():
            self._wake.set()  # a stopped process's records (adopted by the spool) go first

    def submit(self, records: list[Record]) -> bool:
        """Spool the records (one write to local disk, never a wait for SQL); False when the spool is full."""
        if not records:
            return True
        ok = self.spool.append([r.to_dict() for r in records])
        self._wake.set()
        return ok

    def depth(self) -> int:
        """Bytes of records spooled and not yet written to SQL (the metrics' history queue depth)."""
        return self.spool.bytes_waiting()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is in SQL; False when the database did not take it in time.

        While the database is failing, one more attempt is made at once and its failure ends the wait (a stop
        need not wait out the timeout).  Whatever is not in SQL yet is on disk and is sent later.
        """
        deadline = time.monotonic() + timeout
        failures = self._failures
        self._hurry.set()
        self._wake.set()
        try:
            with self._drained:
                while self.spool.bytes_waiting() > 0:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive() or self._failures > failures:
                        self.spool.sync()
                        return False
                    self._drained.wait(min(left, 0.5))
            return True
        finally:
            self._hurry.clear()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after one last attempt to send what is spooled; what SQL did not take stays on disk."""
        self._hurry.set()
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Stuck in a call to a frozen database: the records are safe on disk; the next start sends them.
            self.spool.sync()
            log.warning("history: database did not answer within %.0f s; the spool keeps the rest", timeout)
            return
        self.spool.close()

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            if backoff:
                self._hurry.wait(backoff)  # flush and close cut the pause short
            elif not self._wake.wait(1.0):
                self._adopt_orphans()
                continue
            self._adopt_orphans()  # also under steady load, when the thread is never idle for a second
            self._wake.clear()
            if not self._hurry.is_set() and self.spool.bytes_waiting() and not backoff:
                # Let records gather: sleeping through the linger keeps this thread off the CPU and out of the
                # mail threads' way (flush and close cut it short).
                self._hurry.wait(self._linger)
            backoff = 0.0 if self._send_all() else min(max(backoff * 2, 0.25), self._max_backoff)
            with self._drained:
                self._drained.notify_all()

    def _adopt_orphans(self) -> None:
        # A worker process that died leaves its segments unlocked: pick them up now and then.
        now = time.monotonic()
        if now - self._adopted_at >= 30.0:
            self._adopted_at = now
            if self.spool.adopt():
                self._wake.set()

    def _send_all(self) -> bool:
        """Send batches until the spool is empty; False when the database failed."""
        self.spool.sync()
        while not self._stop.is_set() or self._hurry.is_set():
            batch = self.spool.read(self._batch)
            if batch is None:
                return True
            # Only a batch that was tried before (a failed attempt, or a stopped process's segment) can be in SQL
            # already; records this process spooled and never sent skip the look-up of stored keys, which was
            # the history thread's biggest cost under load.
            maybe_stored = self._unsure or batch.adopted
            if not self._write([Record.from_dict(item) for item in batch.items], maybe_stored):
                return False
            self.spool.commit(batch)
        return True

    def _write(self, batch: list[Record], maybe_stored: bool) -> bool:
        self._unsure = True  # until this attempt is known to have stored the batch
        try:
            with self._engine.begin() as conn:
                write(conn, batch, maybe_stored=maybe_stored)
        except SQLAlchemyError as exc:
            self._failures += 1
            if not self._failing_since:
                self._failing_since = time.monotonic()
                log.error(
                    "history: database unavailable (%s); records wait in the spool %s (%d bytes) and are "
                    "written when it is back",
                    str(exc).splitlines()[0],
                    self.spool.directory,
                    self.spool.bytes_waiting(),
                )
            return False
        if self._failing_since:
            log.warning(
                "history: database back after %.0f s; replaying the spool (%d bytes)",
                time.monotonic() - self._failing_since,
                self.spool.bytes_waiting(),
            )
            self._failing_since = 0.0
        self._unsure = False
        return True
