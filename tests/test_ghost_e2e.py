"""The failure policy and ghost tickets through a real Postfix, Dovecot, Redis and the real postroom daemon.

A ghost is a ticket that Redis opened for a call postroom had given up on (its client timed out while Redis was
busy): the mail went on without a number.  Here Redis is kept busy by another client's long script while a
customer's mail arrives, so postroom's open call times out on the client and runs in Redis afterwards.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from email.utils import formatdate

import pytest

from postroom import replies
from postroom.config import Config, with_changes
from postroom_testbed import ADAPTERS, Adapter, Deployment, deploy
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.test_commands_e2e import events
from tests.test_inbound_e2e import SUPPORT, customer_mail
from tests.test_redis_loss_e2e import wait_until
from tests.test_store import busy_redis

pytestmark = pytest.mark.e2e
ALICE, BOB = CUSTOMERS[0], CUSTOMERS[1]
SEQ = f"postroom:{{{SUPPORT}}}:seq"


def config(on_error: str) -> Config:
    # A short client timeout, so that a script of about a second in Redis outlasts postroom's patience.
    return with_changes(e2e_base_config(), {"milter": {"on_error": on_error}, "redis": {"timeout_seconds": 0.3}})


def without_message_id(sender: str, subject: str) -> EmailMessage:
    """A mail as a sloppy mailer sends it: with a Date (every MTA's mail has one), without a Message-ID."""
    msg = customer_mail(sender, subject)
    del msg["Message-ID"]
    msg["Date"] = formatdate()
    return msg


def as_from_the_internet(d: Deployment) -> None:
    """Postfix adds a missing Message-ID (and Date) only for local clients (local_header_rewrite_clients), and the
    test's client is on 127.0.0.1: treat it as a remote MTA, so the mail reaches postroom without a Message-ID."""
    d.stack.postfix.set_main_cf({"local_header_rewrite_clients": ""})


@contextmanager
def redis_busy(d: Deployment) -> Iterator[None]:
    """Another client's script keeps Redis busy for about a second (well below Redis's 5 s busy limit, past which
    Redis would refuse postroom's call instead of running it late)."""
    busy = busy_redis(d.stack.redis.url, 1.0, "postroom-busy")
    try:
        yield
    finally:
        busy.join()


def send_or_451(d: Deployment, msg: EmailMessage) -> int:
    """Send through the MX port: 250, or the 451 a milter's tempfail gives the sending MTA."""
    try:
        d.stack.send(msg, mail_from=ALICE, rcpts=[SUPPORT])
    except smtplib.SMTPDataError as exc:
        assert replies.S451_STORE_UNAVAILABLE.text.encode() in exc.smtp_error
        return exc.smtp_code
    return 250


def warm_up(d: Deployment) -> None:
    """#1, so that the mailbox's epoch check (once per process) is behind us and the open is the first call."""
    d.stack.send(customer_mail(BOB, "Warm-up"), mail_from=BOB, rcpts=[SUPPORT])
    d.stack.wait_for(SUPPORT, "INBOX", 1)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_tempfail_policy_keeps_the_mail_with_its_sender_until_redis_is_back(adapter: Adapter) -> None:
    with deploy(config("tempfail"), CUSTOMERS, adapter=adapter) as d:
        d.stack.redis.stop()
        first = customer_mail(ALICE, "Printer on fire")
        code = send_or_451(d, first)
        if adapter != "smtpd":
            assert code == 451  # refused inside the SMTP session: the customer's MTA keeps the mail
        else:
            assert code == 250  # taken by Postfix, then deferred by the filter's 451
            wait_until("the mail deferred in Postfix's queue", lambda: d.stack.postfix.deferred_count() == 1)
            assert replies.S451_STORE_UNAVAILABLE.text in d.stack.postfix.log_text()
        assert d.stack.fetch(SUPPORT) == []

        d.stack.redis.start()
        if adapter != "smtpd":
            d.stack.send(first, mail_from=ALICE, rcpts=[SUPPORT])  # the customer's MTA tries again
        else:
            d.stack.postfix.flush()
        [got] = d.stack.wait_for(SUPPORT, "INBOX", 1)
        assert str(got["Subject"]) == "[Support #1] Printer on fire"
        assert got["X-Postroom-Status"] is None


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_degraded_mail_without_message_id_takes_the_ticket_its_timed_out_call_opened(adapter: Adapter) -> None:
    with deploy(config("degraded"), CUSTOMERS, adapter=adapter) as d:
        as_from_the_internet(d)
        warm_up(d)
        with redis_busy(d):
            d.stack.send(without_message_id(ALICE, "Printer on fire"), mail_from=ALICE, rcpts=[SUPPORT])
            got = d.stack.wait_for(SUPPORT, "INBOX", 2)
        assert got[1]["X-Postroom-Status"] == "degraded"
        r = d.redis_client()
        wait_until("Redis ran the open call postroom gave up on", lambda: r.get(SEQ) == "2")
        found = events(d, 2, timeout=60)  # once the backlog took the ghost
        assert [(kind, detail) for kind, _actor, detail in found] == [("opened", "delivered degraded, its ticket kept")]

        d.stack.send(customer_mail(BOB, "Next"), mail_from=BOB, rcpts=[SUPPORT])
        assert str(d.stack.wait_for(SUPPORT, "INBOX", 3)[2]["Subject"]) == "[Support #3] Next"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_refused_mail_leaves_a_void_ticket_that_its_retry_makes_its_own(adapter: Adapter) -> None:
    with deploy(config("tempfail"), CUSTOMERS, adapter=adapter) as d:
        as_from_the_internet(d)
        # Postfix retries the deferred mail when the test flushes, not on its own before the backlog ran (the
        # retry coming first is the other order: it takes the ticket, test_ghost.py).
        d.stack.postfix.set_main_cf(
            {"queue_run_delay": "300s", "minimal_backoff_time": "300s", "maximal_backoff_time": "300s"}
        )
        warm_up(d)
        mail = without_message_id(ALICE, "Printer on fire")
        with redis_busy(d):
            code = send_or_451(d, mail)
        r = d.redis_client()
        wait_until("Redis ran the open call postroom gave up on", lambda: r.get(SEQ) == "2")
        assert [kind for kind, _a, _d in events(d, 2, timeout=60)] == ["void"]  # once the backlog made #2 void
        assert r.hget(f"postroom:{{{SUPPORT}}}:t:2", "state") == "closed"

        if adapter != "smtpd":
            assert code == 451
            d.stack.send(mail, mail_from=ALICE, rcpts=[SUPPORT])  # the customer's MTA tries again
        else:
            wait_until("the mail deferred in Postfix's queue", lambda: d.stack.postfix.deferred_count() == 1)
            d.stack.postfix.flush()  # Postfix tries the same queue file again
        got = d.stack.wait_for(SUPPORT, "INBOX", 2)[1]
        assert str(got["Subject"]) == "[Support #2] Printer on fire"
        assert r.get(SEQ) == "2"  # no number for the retry: the void ticket is its own again
        wait_until("the retry recorded", lambda: len(events(d, 2)) == 2)
        assert [kind for kind, _a, _d in events(d, 2)] == ["void", "opened"]
        assert r.hget(f"postroom:{{{SUPPORT}}}:t:2", "tags") == ""
