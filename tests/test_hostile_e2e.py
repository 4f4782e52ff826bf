"""Hostile and strange mail through the real Postfix, milter, Redis and Dovecot (issue 15): long encoded subjects,
raw 8-bit subjects, two Subject lines, a Message-ID reused by a stranger, robot senders, and bounces."""

from __future__ import annotations

import base64
import email
import email.policy
import re
import time
import uuid
from collections.abc import Callable, Iterator
from email.header import Header, decode_header, make_header
from email.message import EmailMessage

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from postroom.config import parse_config
from postroom.history_rows import EventRow, TicketRow
from postroom_testbed import Deployment, deploy
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.test_bounce import fixture
from tests.test_inbound_e2e import SUPPORT, customer_mail, deliver, ticket_number
from tests.test_outbound_e2e import agent_mail, mid, submit

pytestmark = pytest.mark.e2e

ROBOT = "gmail-noreply@customer.test"


@pytest.fixture(scope="module")
def hostile() -> Iterator[Deployment]:
    data = e2e_base_config().model_dump()
    data["autoreply"] = {**data["autoreply"], "acknowledge": True, "daily_cap": 50}
    with deploy(parse_config(data, environ={}), (*CUSTOMERS, ROBOT, "nobody@customer.test")) as d:
        yield d


def settle(d: Deployment) -> None:
    d.stack.postfix.wait_queue_empty()
    time.sleep(1.0)
    d.stack.postfix.wait_queue_empty()


def raw_mail(sender: str, subject_lines: list[bytes], *, msgid: str = "", extra: bytes = b"") -> tuple[bytes, str]:
    msgid = msgid or f"<{uuid.uuid4().hex}@customer.test>"
    head = f"From: <{sender}>\r\nTo: {SUPPORT}\r\nMessage-ID: {msgid}\r\n".encode()
    head += b"".join(b"Subject: " + s + b"\r\n" for s in subject_lines) + extra
    return head + b"\r\nHello\r\n", msgid


def raw_delivered(d: Deployment, msgid: str, folder: str = "INBOX", count: int = 1) -> list[bytes]:
    deadline = time.monotonic() + 30
    while True:
        found = d.stack.find_raw(SUPPORT, msgid, folder)
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"{msgid} not in {SUPPORT}/{folder}"
        time.sleep(0.2)


def arrived(d: Deployment, folder: str, check: Callable[[EmailMessage], bool]) -> list[EmailMessage]:
    """The mails in ``folder`` of the shared mailbox that pass ``check``, once there is at least one."""
    deadline = time.monotonic() + 30
    while True:
        found = [m for m in d.stack.fetch(SUPPORT, folder) if check(m)] if folder in d.stack.folders(SUPPORT) else []
        if found:
            return found
        assert time.monotonic() < deadline, f"nothing arrived in {SUPPORT}/{folder}"
        time.sleep(0.2)


def header_lines(raw: bytes, name: bytes) -> list[bytes]:
    """The physical lines of the first header ``name`` in a raw mail (its first line and continuations)."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    start = next(i for i, line in enumerate(head) if line.lower().startswith(name.lower() + b":"))
    end = start + 1
    while end < len(head) and head[end][:1] in (b" ", b"\t"):
        end += 1
    return head[start:end]


def encoded(text: str) -> bytes:
    """RFC 2047 as email.header writes it (policy.default's own folding loses spaces between long encoded words)."""
    return Header(text, "utf-8").encode(maxlinelen=76).replace("\n", "\r\n").encode()


def test_a_long_encoded_subject_arrives_folded_decodable_and_whole(hostile: Deployment) -> None:
    d = hostile
    for text in ("Привет мир " * 180).strip(), "Ж" * 420:
        data, msgid = raw_mail("alice@customer.test", [encoded(text)])
        d.stack.send(data, mail_from="alice@customer.test", rcpts=[SUPPORT])
        raw = raw_delivered(d, msgid)[0]
        got = email.message_from_bytes(raw, policy=email.policy.default)
        n = ticket_number(got)
        lines = header_lines(raw, b"Subject")
        # Folded into short lines (Postfix never has to break one at 998 bytes, which would cut an encoded word).
        assert all(len(line) <= 78 for line in lines), max(len(line) for line in lines)
        want = f"[Support #{n}] {text}"
        assert str(got["Subject"]) == want
        unfolded = b"".join(lines)[len(b"Subject:") :].decode("ascii").replace("\r\n", "")
        assert str(make_header(decode_header(unfolded))) == want


def test_a_huge_subject_is_left_as_it_came_and_the_acknowledgement_quotes_a_part(hostile: Deployment) -> None:
    d = hostile
    text = ("Привет мир " * 700).strip()  # 7,700 characters, 24 KB encoded
    data, msgid = raw_mail("alice@customer.test", [encoded(text)])
    d.stack.send(data, mail_from="alice@customer.test", rcpts=[SUPPORT])
    raw = raw_delivered(d, msgid)[0]
    n = ticket_number(email.message_from_bytes(raw, policy=email.policy.default))
    # Byte for byte as it came: too long to rewrite through a milter (mime.SUBJECT_MAX).
    assert b"Subject: " + encoded(text) + b"\r\n" in raw
    settle(d)
    acks = [m for m in d.stack.fetch("alice@customer.test") if m["In-Reply-To"] == msgid]
    assert len(acks) == 1
    ack_subject = str(acks[0]["Subject"])
    assert ack_subject.startswith(f"Re: [Support #{n}] Привет мир") and len(ack_subject) < 250


def test_a_raw_shift_jis_subject_keeps_its_bytes(hostile: Deployment) -> None:
    d = hostile
    original = "ツール".encode("shift_jis") + b" 0x81"
    data, msgid = raw_mail("alice@customer.test", [original])
    d.stack.send(data, mail_from="alice@customer.test", rcpts=[SUPPORT])
    raw = raw_delivered(d, msgid)[0]
    value = b"".join(header_lines(raw, b"Subject"))
    got = email.message_from_bytes(raw, policy=email.policy.default)
    n = ticket_number(got)
    assert "\ufffd" not in str(got["Subject"])
    assert str(got["Subject"]) == f"[Support #{n}] ツール 0x81"
    # The original bytes are in the mail, byte for byte, inside words labelled with their charset.
    words = re.findall(rb"=\?shift_jis\?b\?([A-Za-z0-9+/=]+)\?=", value)
    assert b"".join(base64.b64decode(w) for w in words) == "ツール".encode("shift_jis")
    assert value.endswith(b" 0x81")


def test_a_second_subject_line_is_kept(hostile: Deployment) -> None:
    d = hostile
    data, msgid = raw_mail("alice@customer.test", [b"First line", b"Second line"])
    d.stack.send(data, mail_from="alice@customer.test", rcpts=[SUPPORT])
    raw = raw_delivered(d, msgid)[0]
    subjects = re.findall(rb"^Subject: (.*)$", raw.split(b"\r\n\r\n", 1)[0], re.MULTILINE)
    assert len(subjects) == 2
    assert re.fullmatch(rb"\[Support #\d+\] First line\r?", subjects[0])
    assert subjects[1].rstrip(b"\r") == b"Second line"


def test_a_reused_message_id_does_not_pull_the_first_customers_replies_away(hostile: Deployment) -> None:
    d = hostile
    first = customer_mail("alice@customer.test", "My order")
    n_alice = ticket_number(deliver(d, first))
    # Mallory sends a mail with Alice's Message-ID (on purpose, or a broken mailer): a ticket of his own.
    stolen = customer_mail("mallory@customer.test", "Give me her replies")
    stolen.replace_header("Message-ID", str(first["Message-ID"]))
    d.stack.send(stolen, mail_from="mallory@customer.test", rcpts=[SUPPORT])
    mallory_copy = [
        email.message_from_bytes(r, policy=email.policy.default)
        for r in raw_delivered(d, str(first["Message-ID"]), count=2)
        if b"Give me her replies" in r
    ]
    n_mallory = ticket_number(mallory_copy[0])
    assert n_mallory != n_alice
    # Alice answers her own mail: it still threads into her ticket.
    answer = customer_mail("alice@customer.test", "Re: My order", in_reply_to=str(first["Message-ID"]))
    assert ticket_number(deliver(d, answer)) == n_alice
    # Mallory "answers" the same ID: he is no participant of Alice's ticket, so it threads by his own token.
    his = customer_mail("mallory@customer.test", f"Re: [Support #{n_mallory}] x", in_reply_to=str(first["Message-ID"]))
    assert ticket_number(deliver(d, his)) == n_mallory


def test_a_noreply_robot_gets_no_acknowledgement(hostile: Deployment) -> None:
    d = hostile
    got = deliver(d, customer_mail(ROBOT, "Your Google account"))
    assert ticket_number(got) >= 1
    deliver(d, customer_mail("bob@customer.test", "A person"))
    settle(d)
    assert any(m["Auto-Submitted"] == "auto-replied" for m in d.stack.fetch("bob@customer.test"))
    assert d.stack.fetch(ROBOT) == []


def _events(d: Deployment, number: int) -> list[str]:
    engine = create_engine(d.config.database.url)
    try:
        deadline = time.monotonic() + 10
        while True:
            with Session(engine) as s:
                ticket = s.scalars(select(TicketRow).where(TicketRow.number == number)).first()
                kinds = (
                    [e.kind for e in s.scalars(select(EventRow).where(EventRow.ticket_id == ticket.id))]
                    if ticket
                    else []
                )
            if "delivery_failure" in kinds or time.monotonic() > deadline:
                return kinds
            time.sleep(0.2)
    finally:
        engine.dispose()


def _reply_to_ticket(d: Deployment, to: str) -> tuple[int, EmailMessage]:
    first = customer_mail("alice@customer.test", "Printer on fire")
    n = ticket_number(deliver(d, first))
    reply = agent_mail(
        "meier@example.test", to, f"Re: [Support #{n}] Printer on fire", in_reply_to=str(first["Message-ID"])
    )
    submit(d, "meier", reply, [to])
    return n, reply


def test_a_real_postfix_bounce_of_an_agents_reply_joins_its_ticket(hostile: Deployment) -> None:
    d = hostile
    # Postfix takes a reply to an unknown user of customer.test and bounces it after the queue (Dovecot's LMTP
    # refuses the user), as the customer's MX would.  Its own bounce goes to support@ without a milter (a local
    # bounce), so it is sent again through the SMTP port, with the null sender, as a remote MTA sends its DSN.
    d.stack.postfix.set_main_cf({"smtpd_reject_unlisted_recipient": "no"})
    try:
        n, reply = _reply_to_ticket(d, "ghost@customer.test")
    finally:
        d.stack.postfix.set_main_cf({"smtpd_reject_unlisted_recipient": "yes"})
    deadline = time.monotonic() + 30
    while not (dsn := [r for r in d.stack.find_raw(SUPPORT, mid(reply)) if b"MAILER-DAEMON" in r]):
        assert time.monotonic() < deadline, "Postfix made no bounce"
        time.sleep(0.2)
    data = dsn[0].replace(b"Message-Id: <", b"Message-Id: <again.", 1)
    d.stack.send(data, mail_from="", rcpts=[SUPPORT])
    [got] = arrived(d, "Meier", lambda m: bool(m["X-Postroom-Delivery-Failure"]) and mid(reply) in m.as_string())
    assert ticket_number(got) == n
    assert str(got["X-Postroom-Delivery-Failure"]).startswith("failed ghost@customer.test 5.")
    assert str(got["X-Postroom-Delivery-Failure"]).endswith(f"(Support #{n})")
    assert "delivery_failure" in _events(d, n)


def test_an_exchange_ndr_joins_its_ticket_and_an_unknown_bounce_opens_none(hostile: Deployment) -> None:
    d = hostile
    n, reply = _reply_to_ticket(d, "alice@customer.test")
    ndr = fixture("exchange-ndr.eml", reply_id=mid(reply)).replace(b"[Support #1]", f"[Support #{n}]".encode())
    d.stack.send(ndr, mail_from="", rcpts=[SUPPORT])
    got = arrived(d, "Meier", lambda m: str(m["Subject"]).startswith("Undeliverable:") and mid(reply) in m.as_string())
    assert [ticket_number(m) for m in got] == [n]
    before = len(d.redis_client().keys(f"postroom:{{{SUPPORT}}}:t:*"))
    stray = fixture("postfix-dsn.eml", reply_id="forged@example.test", customer_id="forged@spam.test")
    d.stack.send(stray.replace(b"<2026", b"<stray.2026"), mail_from="", rcpts=[SUPPORT])
    [landed] = [r for r in raw_delivered(d, "stray.2026") if b"forged@example.test" in r]
    assert b"X-Postroom-Delivery-Failure: failed alice@customer.test 5.1.1 (no ticket" in landed
    assert b"X-Postroom-Ticket" not in landed
    assert len(d.redis_client().keys(f"postroom:{{{SUPPORT}}}:t:*")) == before
