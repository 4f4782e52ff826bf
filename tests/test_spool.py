"""The history spool: records survive a dead database, a killed process and a replay; memory and disk stay bounded."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from postroom.history import HistoryWriter, make_engine, migrate, write
from postroom.history_rows import EventRow, MessageRow, TicketRow
from postroom.spool import Spool
from postroom.tickets import Record

BOX = "support@example.test"


def rec(number: int, event: str, **kw: object) -> Record:
    return Record(mailbox=BOX, number=number, event=event, at=1_700_000_000.0, **kw)  # type: ignore[arg-type]


def counts(url: str) -> tuple[int, int, int]:
    engine = make_engine(url)
    with Session(engine) as s:
        found = tuple(s.scalar(select(func.count()).select_from(t)) or 0 for t in (TicketRow, MessageRow, EventRow))
    engine.dispose()
    return found  # type: ignore[return-value]


def test_a_record_delivered_twice_is_stored_once(db_url: str) -> None:
    migrate(db_url)
    engine = make_engine(db_url)
    batch = [rec(1, "opened", message_id="a@c", queue_id="Q1", direction="inbound"), rec(1, "take", direction="")]
    for _ in range(2):
        with Session(engine) as s, s.begin():
            write(s, batch + batch)  # twice in one batch, and the whole batch twice
    engine.dispose()
    assert counts(db_url) == (1, 1, 2)


def test_records_of_a_stopped_process_are_replayed_by_the_next_in_order(sqlite_url: str, tmp_path: Path) -> None:
    """The first process wrote a batch to SQL but stopped before stepping past it: replayed, stored once."""
    migrate(sqlite_url)
    spool_dir = tmp_path / "spool"
    first = Spool(spool_dir, 1 << 20)
    records = [rec(1, "opened", message_id="a@c", queue_id="Q1", customer="alice@c")]
    records += [
        rec(1, "followup", message_id=f"m{i}@c", queue_id=f"Q{i + 2}", owner="meier", state="open") for i in range(5)
    ]
    records.append(rec(1, "close", state="closed", owner="meier", direction=""))
    first.append([r.to_dict() for r in records])
    engine = make_engine(sqlite_url)
    with Session(engine) as s, s.begin():
        write(s, records[:3])  # sent, but the spool never heard it was stored
    first.close()
    assert len(list(spool_dir.iterdir())) == 1

    writer = HistoryWriter(engine, Spool(spool_dir, 1 << 20))
    writer.start()
    assert writer.flush()
    writer.close()
    with Session(engine) as s:
        assert s.scalars(select(EventRow.kind).order_by(EventRow.id)).all() == ["opened"] + ["followup"] * 5 + ["close"]
        assert s.scalars(select(TicketRow.state)).all() == ["closed"]
    assert list(spool_dir.iterdir()) == []
    engine.dispose()


class _LostAnswer(sqlite3.Connection):
    """A database whose first COMMIT goes through but whose answer is lost (a dropped connection, a timeout)."""

    lose = 1

    def commit(self) -> None:
        super().commit()
        if _LostAnswer.lose:
            _LostAnswer.lose -= 1
            raise sqlite3.OperationalError("disk I/O error")


def test_a_batch_stored_but_not_confirmed_is_not_stored_twice(sqlite_url: str, tmp_path: Path) -> None:
    """The writer tries again after a failed attempt; the failed one may have reached SQL, so the second stores
    only what is missing, and the records after it are stored once too."""
    migrate(sqlite_url)
    _LostAnswer.lose = 1
    path = sqlite_url.removeprefix("sqlite:///")
    engine = create_engine(
        "sqlite://", creator=lambda: sqlite3.connect(path, factory=_LostAnswer, check_same_thread=False)
    )
    writer = HistoryWriter(engine, Spool(tmp_path / "spool", 1 << 20), max_backoff=0.1)
    writer.start()
    writer.submit([rec(1, "opened", message_id="a@c", queue_id="Q1", direction="inbound"), rec(1, "take")])
    # The first attempt's answer is lost (the writer cannot know the batch is stored); it tries again.
    deadline = time.monotonic() + 10
    while not writer.flush(1.0) and time.monotonic() < deadline:
        pass
    writer.submit([rec(1, "followup", message_id="b@c", queue_id="Q2", direction="inbound")])
    assert writer.flush()
    writer.close()
    engine.dispose()
    assert _LostAnswer.lose == 0
    assert counts(sqlite_url) == (1, 2, 3)


KILLED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from postroom.history import HistoryWriter, make_engine
    from postroom.tickets import Record
    from postroom.spool import Spool
    # The database is not migrated yet: every write fails, the records stay in the spool.
    writer = HistoryWriter(make_engine(sys.argv[1]), Spool(Path(sys.argv[2]), 1 << 24), max_backoff=0.1)
    writer.start()
    for i in range(500):
        writer.submit([Record(mailbox="support@example.test", number=i + 1, event="opened", at=1.0,
                              message_id=f"m{i}@c", queue_id=f"Q{i}")])
    print("submitted", flush=True)
    time.sleep(60)
    """
)


def test_sigkill_loses_nothing_that_was_spooled(sqlite_url: str, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, sqlite_url, str(spool_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "submitted"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    writer = HistoryWriter(engine, Spool(spool_dir, 1 << 24))
    writer.start()
    assert writer.flush()
    writer.close()
    engine.dispose()
    assert counts(sqlite_url) == (500, 500, 500)


def test_a_full_spool_refuses_records_with_a_log_line(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool", 4096)
    taken = 0
    with caplog.at_level(logging.ERROR, logger="postroom.history"):
        for i in range(100):
            taken += spool.append([rec(i + 1, "opened", queue_id=f"Q{i}").to_dict()])
    assert 0 < taken < 100
    assert spool.refused == 100 - taken
    assert spool.bytes_waiting() <= 4096
    assert "history spool full" in caplog.text
    assert caplog.text.count("history spool full") == 1  # once a minute, not once a mail
    spool.close()


def test_memory_stays_flat_while_the_database_is_away(sqlite_url: str, tmp_path: Path) -> None:
    """Records wait on disk, not in a queue: 20,000 of them cost the process no memory to speak of."""
    writer = HistoryWriter(make_engine(sqlite_url), Spool(tmp_path / "spool", 1 << 30), max_backoff=0.2)
    writer.start()
    one = [rec(1, "followup", message_id="x" * 200 + "@c", queue_id="Q", subject="s" * 300).to_dict()]
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(20_000):
            writer.spool.append(one)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    waiting = writer.spool.bytes_waiting()
    writer.close(timeout=2)
    assert waiting > 10_000_000  # about 13 MB of records wait in the spool...
    assert after - before < 1_000_000  # ...and not in this process's memory
