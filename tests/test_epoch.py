"""Redis losing its data never makes postroom issue a ticket number twice (real, private redis-servers)."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from sqlalchemy.orm import Session

from postroom.epoch import HistoryUnavailable, persistence_problems
from postroom.history import make_engine, migrate, write
from postroom.rebuild import history_floor, rebuild
from postroom.store.redis import RedisStore
from postroom.tickets import NewTicket, Record, StoreUnavailable
from postroom_testbed import RedisServer, postgres_server

BOX = "support@example.test"


def make(url: str) -> RedisStore:
    return RedisStore.from_url(url, key_prefix="postroom", message_index_days=1, timeout=2.0)


def new(customer: str = "alice@customer.test", mid: str = "") -> NewTicket:
    return NewTicket(customer=customer, subject="Hello", participants=(customer,), message_ids=(mid,) if mid else ())


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test may kill."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def kill_and_restart(server: RedisServer) -> None:
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    server.stop()  # reaps it
    server.start()


def test_an_empty_redis_continues_above_the_history(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = make(redis_url)
    store.guard.floor = lambda mailbox: 41
    lost: list[str] = []
    store.guard.on_loss = lost.append
    with caplog.at_level(logging.ERROR, logger="postroom"):
        assert store.open(BOX, new(), 1.0).number == 42
    assert lost == [BOX] and "Redis lost data for support@example.test" in caplog.text


def test_a_flushed_redis_continues_above_what_this_process_issued(redis_url: str) -> None:
    store = make(redis_url)
    numbers = [store.open(BOX, new(), 1.0).number for _ in range(3)]
    redis.Redis.from_url(redis_url).flushall()  # no restart, no new connection: the open script notices
    numbers += [store.open(BOX, new(), 2.0).number for _ in range(2)]
    assert numbers == [1, 2, 3, 4, 5]


def test_a_stale_snapshot_after_a_crash_is_noticed_by_the_restart(own_redis: RedisServer) -> None:
    """Debian's default: RDB snapshots.  Redis comes back with an old counter and its epoch key still there."""
    store = make(own_redis.url)
    numbers = [store.open(BOX, new(), 1.0).number for _ in range(2)]
    redis.Redis.from_url(own_redis.url).save()  # the snapshot: counter 2
    numbers += [store.open(BOX, new(), 1.0).number for _ in range(3)]
    kill_and_restart(own_redis)  # back with counter 2
    assert int(redis.Redis.from_url(own_redis.url).get(f"postroom:{{{BOX}}}:seq") or 0) == 2
    numbers += [store.open(BOX, new(), 2.0).number for _ in range(2)]
    assert numbers == [1, 2, 3, 4, 5, 6, 7]
    assert store.guard.losses == 1


def test_without_history_and_without_epoch_no_number_is_guessed(redis_url: str) -> None:
    store = make(redis_url)

    def down(mailbox: str) -> int:
        raise HistoryUnavailable("connection refused")

    store.guard.floor = down
    with pytest.raises(StoreUnavailable, match="history cannot tell"):
        store.open(BOX, new(), 1.0)


def test_rebuild_restores_tickets_participants_index_and_counter(redis_url: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    migrate(url)
    engine = make_engine(url)
    at = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    records = [
        Record(BOX, 7, "opened", at, customer="alice@c", ticket_subject="Printer", message_id="a1@c", queue_id="Q1"),
        Record(BOX, 7, "followup", at + 5, owner="meier", state="open", message_id="a2@c", from_addr="bert@c"),
        Record(BOX, 9, "opened", at + 9, customer="carl@c", ticket_subject="Invoice", message_id="c1@c"),
        Record(BOX, 9, "tag", at + 10, customer="carl@c", tags="vip,billing", actor="meier"),
        # #away and #back, each on the ticket of the mail that said it: the last one per agent counts.
        Record(BOX, 7, "away", at + 11, owner="meier", state="open", actor="meier"),
        Record(BOX, 9, "away", at + 12, tags="vip,billing", actor="mueller", detail="until 2099-01-01 08:00 UTC"),
        Record(BOX, 9, "away", at + 13, tags="vip,billing", actor="schulze"),
        Record(BOX, 9, "back", at + 14, tags="vip,billing", actor="schulze"),
        Record(BOX, 9, "away", at + 15, tags="vip,billing", actor="koch", detail="until 2026-01-02 00:00 UTC"),
    ]
    with Session(engine) as s, s.begin():
        write(s, records)
    store = make(redis_url)
    done = rebuild(engine, store.client, "postroom", [BOX], 86400)
    assert (done[0].tickets, done[0].message_ids, done[0].highest, done[0].away) == (2, 3, 9, 2)
    assert store.away(BOX, ["meier", "mueller", "schulze", "koch"]) == {"meier", "mueller"}  # koch's is over
    mueller = store.client.ttl(store.away_key(BOX, "mueller"))
    assert isinstance(mueller, int) and mueller > 0  # ends by itself at the time the agent named
    assert store.lookup(BOX, [], [9], []).by_token[0].ticket.tags == ("vip", "billing")
    found = store.lookup(BOX, ["a2@c"], [7], ["bert@c"])
    assert found.by_reference is not None and found.by_reference.owner == "meier"
    assert found.by_reference.subject == "Printer" and found.by_reference.state == "open"
    assert found.by_token[0].sender_known  # bert wrote to #7: his token is his
    assert store.lookup(BOX, [], [9], ["mallory@x"]).by_token[0].sender_known is False
    store.guard.floor = history_floor(engine)
    assert store.open(BOX, new(), 1.0).number == 10
    again = rebuild(engine, store.client, "postroom", [BOX], 86400)
    assert (again[0].tickets, again[0].message_ids) == (0, 0)  # nothing missing: nothing written twice
    engine.dispose()


def test_persistence_problems_name_aof_and_eviction(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    problems = persistence_problems(client)
    assert any("appendonly" in p for p in problems)  # the test server runs without AOF
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        assert any("noeviction" in p for p in persistence_problems(client))
    finally:
        client.config_set("maxmemory-policy", "noeviction")


def test_a_frozen_history_does_not_hold_the_mail(redis_url: str, tmp_path: Path) -> None:
    """The floor query gives up in time: with the epoch key there, Redis is trusted and the ticket opens."""
    with postgres_server() as pg:
        migrate(pg.url)
        engine = make_engine(pg.url)
        store = make(redis_url)
        store.guard.floor = history_floor(engine, timeout=1.0)
        assert store.open(BOX, new(), 1.0).number == 1  # epoch set while the database answers
        store.guard.forget()  # as after a Redis restart
        pg.freeze()
        try:
            started = time.monotonic()
            assert store.open(BOX, new(), 2.0).number == 2
            assert time.monotonic() - started < 10
        finally:
            pg.thaw()
        engine.dispose()
