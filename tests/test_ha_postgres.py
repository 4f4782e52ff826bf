"""PostgreSQL as the shared history of several hosts: a private server this module may stop and start at will."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from postroom.config import example_config_path, load_config, to_toml, with_changes
from postroom_testbed.ha import MxHosts, PostgresServer
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.test_inbound_e2e import customer_mail, deliver, ticket_number
from tests.test_outbound_e2e import ALICE

HOSTS = 4  # upgrades started at the same moment, as by hosts deployed together


def test_db_upgrade_from_several_hosts_at_once_leaves_one_schema_at_head(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database()
    config = with_changes(load_config(example_config_path(), environ={}), {"database": {"url": url}})
    path = tmp_path / "postroom.toml"
    path.write_text(to_toml(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    cmd = [sys.executable, "-m", "postroom", "db", "upgrade", "--config", str(path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for _ in range(HOSTS)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * HOSTS, outputs
    engine = create_engine(url)
    with engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
    engine.dispose()
    assert len(versions) == 1
    assert {"tickets", "messages", "events", "alembic_version"} <= set(tables)


def history_has(url: str, message_id: str, timeout: float = 15.0) -> bool:
    engine = create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                query = text("SELECT count(*) FROM messages WHERE message_id = :m")
                if conn.execute(query, {"m": message_id.strip("<>")}).scalar():
                    return True
            time.sleep(0.2)
        return False
    finally:
        engine.dispose()


@pytest.mark.e2e
def test_a_postgresql_crash_and_restart_never_touches_the_mail_and_the_history_resumes(
    redis_url: str,
) -> None:
    """The history is off the mail path: with its primary down, mail is ticketed as usual; once the primary is
    back the same milter writes again (rows of the outage itself are the state issue's spool, #14)."""
    postgres = PostgresServer().start()
    try:
        database = postgres.create_database()
        with MxHosts(e2e_base_config(), redis_url=redis_url, database_url=database, hosts=1, customers=CUSTOMERS) as mx:
            host = mx.hosts[0]
            before = customer_mail(ALICE, "Before")
            deliver(host, before)
            assert history_has(database, str(before["Message-ID"]))
            postgres.stop("immediate")  # a crash: no shutdown checkpoint, every connection cut
            during = deliver(host, customer_mail(ALICE, "During"))
            assert during["X-Postroom-Status"] is None and ticket_number(during) > 0
            postgres.restart()
            after = customer_mail(ALICE, "After")
            deliver(host, after)
            assert history_has(database, str(after["Message-ID"]))
            assert host.daemon.is_running()
    finally:
        postgres.remove()
