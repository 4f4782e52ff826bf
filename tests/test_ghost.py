"""No ghost tickets: an open call the client gave up on (timeout) but Redis still ran is used by its mail later."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import redis

from postroom.backlog import Backlog
from postroom.config import example_config_path, load_config
from postroom.parts import Parts
from postroom.pipeline import Message, process
from postroom.spool import Spool
from postroom.store.redis import RedisStore
from postroom.tickets import NewTicket
from postroom.verdict import Action, Envelope

BOX = "support@example.test"
ALICE = "alice@customer.test"


def mail() -> Message:
    headers = [("From", ALICE), ("To", BOX), ("Subject", "Printer on fire"), ("Message-ID", "<ghost-1@customer.test>")]
    env = Envelope(mail_from=f"<{ALICE}>", rcpts=[f"<{BOX}>"], queue_id="QGHOST")
    return Message(env, headers, body=lambda: b"Help\r\n")


def test_an_open_that_timed_out_on_the_client_is_the_mails_ticket_later(redis_url: str, tmp_path: Path) -> None:
    config = load_config(example_config_path(), environ={})
    impatient = RedisStore.from_url(redis_url, key_prefix="postroom", message_index_days=1, timeout=0.1)
    impatient.guard.check(BOX, impatient.counter_key(BOX))
    impatient.open("sales@example.test", NewTicket("x@y", "warm-up", ("x@y",), ()), 0.5)  # loads the script
    # Another client's long script keeps Redis busy: our open waits in line, the client gives up, Redis runs it.
    busy = threading.Thread(
        target=redis.Redis.from_url(redis_url).eval, args=("local i = 0 while i < 2e7 do i = i + 1 end", 0)
    )
    busy.start()
    time.sleep(0.05)
    out = process(mail(), Parts(config, impatient), 1.0)
    busy.join()
    assert out.verdict.action is Action.ACCEPT and out.verdict.summary == "degraded delivery"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + 5
    while client.get(f"postroom:{{{BOX}}}:seq") != "1":  # the ghost: opened, its mail delivered without it
        assert time.monotonic() < deadline
        time.sleep(0.05)

    store = RedisStore.from_url(redis_url, key_prefix="postroom", message_index_days=1, timeout=2.0)
    backlog = Backlog(Spool(tmp_path / "degraded", 1 << 20), store, None)
    backlog.submit(out.pending)
    assert backlog.drain_once()
    assert client.get(f"postroom:{{{BOX}}}:seq") == "1"  # the mail took the ghost's number; none opened twice
    assert store.lookup(BOX, ["ghost-1@customer.test"], [], []).by_reference is not None
    backlog.close()
