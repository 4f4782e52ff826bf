"""Inbound end to end: a customer's mail through a real Postfix and the real milter into Dovecot, read over IMAP."""

from __future__ import annotations

import re
import time
import uuid
from email.message import EmailMessage
from email.utils import make_msgid

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from postroom.history_rows import EventRow, MessageRow, TicketRow
from postroom_testbed import Deployment

pytestmark = pytest.mark.e2e

SUPPORT = "support@example.test"
SALES = "sales@example.test"


def customer_mail(
    sender: str, subject: str, *, to: str = SUPPORT, in_reply_to: str = "", extra: dict[str, str] | None = None
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Customer <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(idstring=uuid.uuid4().hex[:8], domain="customer.test")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    for k, v in (extra or {}).items():
        msg[k] = v
    msg.set_content("Hello team,\nplease help.\n")
    return msg


def deliver(
    d: Deployment, msg: EmailMessage, rcpts: list[str] | None = None, folder: str = "INBOX", mailbox: str = SUPPORT
) -> EmailMessage:
    """Send through Postfix's MX port and return the copy Dovecot filed in ``folder`` of ``mailbox``."""
    sender = re.sub(r".*<|>.*", "", str(msg["From"]))
    before = len(d.stack.fetch(mailbox, folder)) if folder in d.stack.folders(mailbox) else 0
    d.stack.send(msg, mail_from=sender, rcpts=rcpts or [SUPPORT])
    got = d.stack.wait_for(mailbox, folder, before + 1)
    mine = [m for m in got if m["Message-ID"] == msg["Message-ID"]]
    assert len(mine) == 1, f"{msg['Message-ID']} delivered {len(mine)} times into {mailbox}/{folder}"
    return mine[0]


def ticket_number(delivered: EmailMessage, tag: str = "Support") -> int:
    for value in delivered.get_all("X-Postroom-Ticket", []):
        m = re.match(rf"^(\d+) \({tag}\)$", str(value))
        if m:
            return int(m.group(1))
    raise AssertionError(f"no X-Postroom-Ticket for {tag}: {delivered.get_all('X-Postroom-Ticket')}")


def queue_id(d: Deployment, message_id: str) -> str:
    m = re.search(rf"([0-9A-Za-z]+): message-id={re.escape(message_id)}", d.stack.postfix.log_text())
    assert m, f"{message_id} not in postfix.log"
    return m.group(1)


def history_rows(d: Deployment, qid: str, timeout: float = 10.0) -> tuple[TicketRow, MessageRow, list[EventRow]]:
    """Wait for the background writer to record the mail with this queue id."""
    engine = create_engine(d.config.database.url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with Session(engine) as s:
                msg = s.scalars(select(MessageRow).where(MessageRow.queue_id == qid)).first()
                if msg is not None:
                    ticket = s.get_one(TicketRow, msg.ticket_id)
                    events = list(s.scalars(select(EventRow).where(EventRow.ticket_id == ticket.id)))
                    s.expunge_all()
                    return ticket, msg, events
            assert time.monotonic() < deadline, f"queue id {qid} not in the SQL history after {timeout}s"
            time.sleep(0.1)
    finally:
        engine.dispose()


def test_new_ticket_lands_in_the_inbox_tagged_and_recorded(deployment: Deployment) -> None:
    d = deployment
    msg = customer_mail("alice@customer.test", "Printer on fire")
    got = deliver(d, msg)
    n = ticket_number(got)
    assert got["Subject"] == f"[Support #{n}] Printer on fire"
    assert got["X-Postroom-Owner"] == f"unassigned (Support #{n})"
    assert got["X-Postroom-State"] == f"new (Support #{n})"
    assert got.get_content() == "Hello team,\nplease help.\n"  # the body is the customer's, untouched
    ticket = d.redis_client().hgetall(f"postroom:{{{SUPPORT}}}:t:{n}")
    assert ticket["customer"] == "alice@customer.test"
    assert ticket["subject"] == "Printer on fire"
    assert ticket["owner"] == ""
    qid = queue_id(d, str(msg["Message-ID"]))
    row, message, events = history_rows(d, qid)
    assert (row.mailbox, row.number, row.customer) == (SUPPORT, n, "alice@customer.test")
    assert message.message_id == str(msg["Message-ID"]).strip("<>")
    assert [e.kind for e in events] == ["opened"]
    # The admin greps the Postfix queue id and finds postroom's line about this mail.
    assert re.search(rf" {qid}: mailbox {re.escape(SUPPORT)} ticket #{n} opened", d.milter.log_text())


def test_customer_follow_up_goes_to_the_owners_folder(deployment: Deployment) -> None:
    d = deployment
    first = customer_mail("bob@customer.test", "Invoice wrong")
    n = ticket_number(deliver(d, first))
    # Ownership is taken by an agent's reply (the outbound path); here it is set where the claim puts it.
    d.redis_client().hset(f"postroom:{{{SUPPORT}}}:t:{n}", mapping={"owner": "meier", "state": "open"})
    # Bob's client threads by In-Reply-To and drops our subject token: threading still finds the ticket.
    answer = customer_mail("bob@customer.test", "AW: Invoice wrong", in_reply_to=str(first["Message-ID"]))
    got = deliver(d, answer, folder="Meier")
    assert ticket_number(got) == n
    assert got["Subject"] == f"AW: [Support #{n}] Invoice wrong"
    assert got["X-Postroom-Owner"] == f"meier (Support #{n})"
    # A later mail that only carries the subject token, from the same customer, threads too.
    again = customer_mail("bob@customer.test", f"Re: [Support #{n}] Invoice wrong")
    assert ticket_number(deliver(d, again, folder="Meier")) == n
    assert [e.kind for e in history_rows(d, queue_id(d, str(again["Message-ID"])))[2]] == [
        "opened",
        "followup",
        "followup",
    ]


def test_the_same_mail_sent_again_joins_its_ticket(deployment: Deployment) -> None:
    d = deployment
    msg = customer_mail("erin@customer.test", "Order 4711 missing")
    n = ticket_number(deliver(d, msg))
    d.redis_client().hset(f"postroom:{{{SUPPORT}}}:t:{n}", mapping={"owner": "meier", "state": "open"})
    seq = d.redis_client().get(f"postroom:{{{SUPPORT}}}:seq")
    # The customer's client did not see our 250 and sends the very same mail again.
    again = deliver(d, msg, folder="Meier")
    assert ticket_number(again) == n
    assert again["Subject"] == f"[Support #{n}] Order 4711 missing"
    assert d.redis_client().get(f"postroom:{{{SUPPORT}}}:seq") == seq  # no ticket was opened for it
    deadline = time.monotonic() + 10
    while True:
        _row, _message, events = history_rows(d, queue_id(d, str(msg["Message-ID"])))
        if len(events) > 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [e.kind for e in events] == ["opened", "duplicate"]


def test_stranger_pasting_a_ticket_token_gets_a_new_ticket(deployment: Deployment) -> None:
    d = deployment
    n = ticket_number(deliver(d, customer_mail("alice@customer.test", "My contract")))
    d.redis_client().hset(f"postroom:{{{SUPPORT}}}:t:{n}", mapping={"owner": "mueller", "state": "open"})
    attack = customer_mail("mallory@customer.test", f"[Support #{n}] send me the contract")
    got = deliver(d, attack)  # INBOX, not Mueller's folder
    m = ticket_number(got)
    assert m != n
    assert got["Subject"] == f"[Support #{m}] send me the contract"
    assert got["X-Postroom-Owner"] == f"unassigned (Support #{m})"
    assert "mallory" not in d.redis_client().smembers(f"postroom:{{{SUPPORT}}}:p:{n}")


def test_forward_opens_a_linked_ticket_reply_prefixes_do_not(deployment: Deployment) -> None:
    d = deployment
    n = ticket_number(deliver(d, customer_mail("alice@customer.test", "Delivery late")))
    fwd = deliver(d, customer_mail("alice@customer.test", f"WG: [Support #{n}] Delivery late"))
    m = ticket_number(fwd)
    assert m != n
    assert fwd["Subject"] == f"[Support #{m}] WG: Delivery late"
    assert fwd["X-Postroom-Linked"] == f"{n} (Support #{m})"
    assert d.redis_client().hget(f"postroom:{{{SUPPORT}}}:t:{m}", "linked") == str(n)
    for prefix in ("AW", "Re", "SV", "Antw"):
        got = deliver(d, customer_mail("alice@customer.test", f"{prefix}: [Support #{n}] Delivery late"))
        assert ticket_number(got) == n, prefix


def test_one_mail_to_two_mailboxes_makes_one_ticket_each_delivered_once(deployment: Deployment) -> None:
    d = deployment
    msg = customer_mail("bob@customer.test", "Quote and support", to=f"{SUPPORT}, {SALES}")
    for_support = deliver(d, msg, rcpts=[SUPPORT, SALES])
    for_sales = d.stack.wait_for(SALES, "INBOX", 1)
    mine = [m for m in for_sales if m["Message-ID"] == msg["Message-ID"]]
    assert len(mine) == 1
    s, t = ticket_number(for_support, "Support"), ticket_number(mine[0], "Sales")
    assert f"[Support #{s}]" in str(for_support["Subject"]) and f"[Sales #{t}]" in str(for_support["Subject"])
    assert d.redis_client().hget(f"postroom:{{{SALES}}}:t:{t}", "customer") == "bob@customer.test"


def test_forged_postroom_headers_from_outside_are_dropped(deployment: Deployment) -> None:
    d = deployment
    msg = customer_mail(
        "alice@customer.test", "Please", extra={"X-Postroom-Owner": "meier", "X-Postroom-Status": "vip"}
    )
    got = deliver(d, msg)
    n = ticket_number(got)
    assert got.get_all("X-Postroom-Owner") == [f"unassigned (Support #{n})"]
    assert got.get_all("X-Postroom-Status") is None


def test_a_forged_notice_to_a_personal_address_loses_its_postroom_headers(deployment: Deployment) -> None:
    """Only a notice whose Message-ID postroom indexed keeps X-Postroom-* headers on its way to a person."""
    d = deployment
    lead = "schulze@example.test"
    msg = customer_mail(
        "mallory@customer.test",
        "[Support #1] Escalation: pay this invoice",
        to=lead,
        extra={"X-Postroom-Notice": "escalation 1 (Support #1)", "X-Postroom-Owner": "meier (Support #1)"},
    )
    got = deliver(d, msg, rcpts=[lead], mailbox=lead)
    assert got["X-Postroom-Notice"] is None and got["X-Postroom-Owner"] is None


def test_redis_down_delivers_unmodified_and_marked_degraded(own_deployment: Deployment) -> None:
    d = own_deployment
    d.stack.redis.stop()
    msg = customer_mail("alice@customer.test", "Nobody home?")
    got = deliver(d, msg)
    assert got["X-Postroom-Status"] == "degraded"
    assert got["Subject"] == "Nobody home?"
    assert got.get("X-Postroom-Ticket") is None
    # Delivered, not deferred, not bounced: the mail is in the mailbox and nothing waits for a retry (qmgr may still be
    # removing the delivered mail's queue file when IMAP shows it, so that part is waited for).
    assert d.stack.postfix.deferred_count() == 0
    d.stack.postfix.wait_queue_empty()
    qid = queue_id(d, str(msg["Message-ID"]))
    assert re.search(rf" {qid}: ticket store unavailable", d.milter.log_text())
    # When Redis is back, the next mail gets its ticket again without restarting postroom.
    d.stack.redis.start()
    later = deliver(d, customer_mail("alice@customer.test", "Hello again"))
    assert ticket_number(later) >= 1
    assert later.get("X-Postroom-Status") is None
