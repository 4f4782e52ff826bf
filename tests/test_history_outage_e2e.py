"""PostgreSQL stopped (fast, immediate) or frozen while mail flows through a real Postfix, Dovecot, Redis and the
real postroom daemon: every mail is delivered and, once the database is back, every history row is there, once.

The database is a private cluster of this test (initdb + pg_ctl in a temp dir), so stopping it harms no one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from postroom.config import to_toml, with_changes
from postroom.history_rows import EventRow, MessageRow
from postroom_testbed import Adapter, Deployment, PostgresServer, deploy, postgres_server
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.test_inbound_e2e import SUPPORT, customer_mail

pytestmark = pytest.mark.e2e


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def on_postgres(d: Deployment, pg: PostgresServer) -> None:
    """Restart the deployment's daemon with its history in the private PostgreSQL."""
    d.daemon.stop()
    database = {"url": pg.url, "spool_dir": str(d.daemon.workdir / "spool")}
    d.daemon.reconfigure(to_toml(with_changes(d.config, {"database": database})))
    d.daemon.start()


def send(d: Deployment, first: int, count: int) -> None:
    for i in range(first, first + count):
        sender = CUSTOMERS[i % 2]
        d.stack.send(customer_mail(sender, f"Question {i}"), mail_from=sender, rcpts=[SUPPORT])


def rows(engine: Engine) -> tuple[list[str], int]:
    with engine.connect() as conn:
        queue_ids = list(conn.execute(select(MessageRow.queue_id)).scalars())
        events = conn.execute(select(func.count()).select_from(EventRow)).scalar_one()
    return queue_ids, events


def wait_rows(pg: PostgresServer, count: int, timeout: float = 60.0) -> tuple[list[str], int]:
    engine = create_engine(pg.url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                found = rows(engine)
            except SQLAlchemyError:
                found = ([], 0)
            if len(found[0]) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.25)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("outage", "adapter"),
    [("fast", "milter"), ("immediate", "milter"), ("freeze", "milter"), ("freeze", "milter-asyncio")],
)
def test_database_outage_while_mail_flows_loses_no_history_row(
    pg: PostgresServer, outage: str, adapter: Adapter
) -> None:
    # The asyncio engine runs ends of message on its one thread: a frozen database must not reach that thread.
    with deploy(e2e_base_config(), CUSTOMERS, adapter=adapter) as d:
        on_postgres(d, pg)
        send(d, 0, 5)
        assert len(wait_rows(pg, 5)[0]) == 5
        if outage == "freeze":
            pg.freeze()
        else:
            pg.stop(outage)
        send(d, 5, 20)
        d.stack.wait_for(SUPPORT, "INBOX", 25)  # the mail does not wait for the database
        if outage == "freeze":
            pg.thaw()
        else:
            pg.start()
        queue_ids, events = wait_rows(pg, 25)
        assert len(queue_ids) == 25 and len(set(queue_ids)) == 25, d.daemon.log_text()
        assert events == 25
        # Every mail got its ticket; Postfix delivers several at once, so the folder's order is not sending order.
        subjects = sorted(str(m["Subject"]) for m in d.stack.fetch(SUPPORT))
        assert subjects == sorted(f"[Support #{i + 1}] Question {i}" for i in range(25))


def test_sigterm_during_an_outage_keeps_the_rows_for_the_next_start(pg: PostgresServer) -> None:
    with deploy(e2e_base_config(), CUSTOMERS, adapter="smtpd") as d:
        on_postgres(d, pg)
        send(d, 0, 1)
        assert len(wait_rows(pg, 1)[0]) == 1
        pg.stop("fast")
        send(d, 1, 10)
        d.stack.wait_for(SUPPORT, "INBOX", 11)
        d.daemon.stop()  # SIGTERM while the database is away: the rows stay in the spool on disk
        assert "stay in the spool" in d.daemon.log_text()
        pg.start()
        d.daemon.start()
        queue_ids, events = wait_rows(pg, 11)
        assert len(set(queue_ids)) == len(queue_ids) == 11 and events == 11, d.daemon.log_text()
