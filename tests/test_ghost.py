"""No ghost tickets: an open call the client gave up on (timeout) but Redis still ran is used by its mail later,
or, when its mail can never take it, closed and recorded as void."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import redis

from postroom.backlog import Backlog
from postroom.config import Config, example_config_path, load_config
from postroom.parts import Parts
from postroom.pipeline import Message, Outcome, process
from postroom.spool import Spool
from postroom.store.redis import RedisStore
from postroom.tickets import NewTicket, Record
from postroom.verdict import Action, Envelope
from tests.test_store import busy_redis

BOX = "support@example.test"
ALICE = "alice@customer.test"
SEQ = f"postroom:{{{BOX}}}:seq"


def mail(message_id: str | None, queue_id: str = "QGHOST") -> Message:
    headers = [("From", ALICE), ("To", BOX), ("Subject", "Printer on fire"), ("Date", "Sun, 29 Nov 2026 10:00 +0000")]
    if message_id is not None:
        headers.append(("Message-ID", message_id))
    env = Envelope(mail_from=f"<{ALICE}>", rcpts=[f"<{BOX}>"], queue_id=queue_id)
    return Message(env, headers, body=lambda: b"Help\r\n")


class History:
    """Stands in for the HistoryWriter: what the backlog hands it."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def submit(self, records: list[Record]) -> None:
        self.records += records


@dataclass
class Ghosts:
    redis_url: str
    client: redis.Redis
    store: RedisStore  # a patient client, for the backlog and the retries
    backlog: Backlog
    history: History

    def timed_out(self, message: Message, config: Config) -> Outcome:
        """Run the pipeline with a client that gives up while Redis, busy with another client's script, still runs
        the open call afterwards: the ghost."""
        impatient = RedisStore.from_url(self.redis_url, key_prefix="postroom", message_index_days=1, timeout=0.1)
        impatient.guard.check(BOX, impatient.counter_key(BOX))
        impatient.open("sales@example.test", NewTicket("x@y", "warm-up", ("x@y",), ()), 0.5)  # loads the script
        before = int(self.client.get(SEQ) or 0)
        busy = busy_redis(self.redis_url, 0.5, impatient.counter_key(BOX))
        out = process(message, Parts(config, impatient), 1.0)
        busy.join()
        deadline = time.monotonic() + 5
        while int(self.client.get(SEQ) or 0) != before + 1:  # Redis ran the open after the client had given up
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return out

    def ticket(self, number: int) -> dict[str, str]:
        found = cast(dict[bytes, bytes], self.client.hgetall(f"postroom:{{{BOX}}}:t:{number}"))
        return {k.decode(): v.decode() for k, v in found.items()}


@pytest.fixture
def ghosts(redis_url: str, tmp_path: Path) -> Iterator[Ghosts]:
    client = redis.Redis.from_url(redis_url)
    store = RedisStore.from_url(redis_url, key_prefix="postroom", message_index_days=1, timeout=2.0)
    history = History()
    backlog = Backlog(Spool(tmp_path / "degraded", 1 << 20), store, history)  # type: ignore[arg-type]
    yield Ghosts(redis_url, client, store, backlog, history)
    backlog.close()
    client.close()


def config(on_error: str = "degraded") -> Config:
    base = load_config(example_config_path(), environ={})
    return base.model_copy(update={"milter": base.milter.model_copy(update={"on_error": on_error})})


@pytest.mark.parametrize("message_id", ["<ghost-1@customer.test>", None], ids=["with Message-ID", "without"])
def test_a_degraded_mail_takes_the_ticket_its_timed_out_call_opened(ghosts: Ghosts, message_id: str | None) -> None:
    out = ghosts.timed_out(mail(message_id), config())
    assert out.verdict.action is Action.ACCEPT and out.verdict.summary == "degraded delivery"
    assert [p.kind for p in out.pending] == ["degraded"]

    ghosts.backlog.submit(out.pending)
    assert ghosts.backlog.drain_once()
    assert ghosts.client.get(SEQ) == b"1"  # the mail took the ghost's number; none opened twice
    [rec] = ghosts.history.records
    assert (rec.number, rec.event, rec.detail) == (1, "opened", "delivered degraded, its ticket kept")
    if message_id is not None:
        assert ghosts.store.lookup(BOX, ["ghost-1@customer.test"], [], []).by_reference is not None


IDS = pytest.mark.parametrize("message_id", ["<ghost-2@customer.test>", None], ids=["with Message-ID", "without"])


@IDS
def test_a_refused_mail_leaves_a_void_ticket_that_its_retry_makes_its_own(
    ghosts: Ghosts, message_id: str | None
) -> None:
    out = ghosts.timed_out(mail(message_id), config("tempfail"))
    assert out.verdict.action is Action.TEMPFAIL
    assert [p.kind for p in out.pending] == ["tempfailed"]

    ghosts.backlog.submit(out.pending)
    assert ghosts.backlog.drain_once()
    assert ghosts.ticket(1)["state"] == "closed" and ghosts.ticket(1)["tags"] == "void"
    [rec] = ghosts.history.records
    assert (rec.number, rec.event, rec.state, rec.direction) == (1, "void", "closed", "")
    ghosts.backlog.submit(out.pending)  # a replay (a crash before the spool moved on) settles nothing twice
    assert ghosts.backlog.drain_once()
    assert len(ghosts.history.records) == 1

    # The sender's retry (another queue file, the same mail) finds #1 and makes it its own again.
    retry = process(mail(message_id, queue_id="QRETRY"), Parts(config("tempfail"), ghosts.store), 2.0)
    assert retry.verdict.action is Action.ACCEPT
    assert [(r.number, r.event, r.state) for r in retry.records] == [(1, "opened", "new")]
    assert ghosts.ticket(1)["tags"] == "" and ghosts.client.get(SEQ) == b"1"


@IDS
def test_a_retry_before_the_backlog_keeps_its_ticket(ghosts: Ghosts, message_id: str | None) -> None:
    out = ghosts.timed_out(mail(message_id), config("tempfail"))
    retry = process(mail(message_id, queue_id="QRETRY"), Parts(config("tempfail"), ghosts.store), 2.0)
    assert [(r.number, r.event) for r in retry.records] == [(1, "duplicate")]

    ghosts.backlog.submit(out.pending)
    assert ghosts.backlog.drain_once()
    assert ghosts.history.records == [] and ghosts.ticket(1)["state"] == "new"


def test_mails_without_message_id_are_told_apart_by_their_headers(ghosts: Ghosts) -> None:
    def variant(date: str | None, subject: str, queue_id: str) -> Message:
        m = mail(None, queue_id)
        m.headers = [(k, v) for k, v in m.headers if k not in ("Date", "Subject")] + [("Subject", subject)]
        m.headers += [("Date", date)] if date is not None else []
        return m

    mails = [
        variant("Sun, 29 Nov 2026 10:00:00 +0000", "Printer", "Q1"),
        variant("Sun, 29 Nov 2026 10:00:01 +0000", "Printer", "Q2"),  # a second later: another mail
        variant("Sun, 29 Nov 2026 10:00:00 +0000", "Scanner", "Q3"),
        variant(None, "Printer", "Q4"),  # without a Date its queue id tells it apart
        variant(None, "Printer", "Q5"),
        variant("Sun, 29 Nov 2026 10:00:00 +0000", "Printer", "Q6"),  # the first again (a retry): no new ticket
    ]
    numbers = [process(m, Parts(config(), ghosts.store), 1.0).records[0].number for m in mails]
    assert numbers == [1, 2, 3, 4, 5, 1]


def test_a_refused_mail_whose_call_never_reached_redis_settles_nothing(ghosts: Ghosts, tmp_path: Path) -> None:
    dead = RedisStore.from_url("redis://127.0.0.1:1/0", key_prefix="postroom", message_index_days=1, timeout=0.2)
    out = process(mail(None), Parts(config("tempfail"), dead), 1.0)
    assert out.verdict.action is Action.TEMPFAIL
    ghosts.backlog.submit(out.pending)
    assert ghosts.backlog.drain_once()
    assert ghosts.history.records == [] and ghosts.client.get(SEQ) is None
