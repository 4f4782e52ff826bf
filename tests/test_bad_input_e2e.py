"""Bad input through the real Postfix and milter: every mail is delivered, nothing is lost, nothing is injected."""

from __future__ import annotations

import re
import uuid
from email.message import EmailMessage

import pytest

from postroom_testbed import Deployment
from tests.test_inbound_e2e import SUPPORT, customer_mail, deliver, queue_id, ticket_number

pytestmark = pytest.mark.e2e


def raw_mail(subject: bytes, *, extra: bytes = b"", body: bytes = b"Hello\r\n") -> tuple[bytes, str]:
    mid = f"<{uuid.uuid4().hex}@customer.test>"
    head = (
        b"From: Alice <alice@customer.test>\r\nTo: support@example.test\r\nSubject: "
        + subject
        + b"\r\nMessage-ID: "
        + mid.encode()
        + b"\r\n"
        + extra
    )
    return head + b"\r\n" + body, mid


def send_raw(d: Deployment, data: bytes, mid: str) -> EmailMessage:
    before = len(d.stack.fetch(SUPPORT))
    d.stack.send(data, mail_from="alice@customer.test", rcpts=[SUPPORT])
    got = [m for m in d.stack.wait_for(SUPPORT, "INBOX", before + 1) if m["Message-ID"] == mid]
    assert len(got) == 1
    return got[0]


def test_raw_8bit_latin1_subject_is_tagged_and_readable(deployment: Deployment) -> None:
    data, mid = raw_mail(b"Gr\xfc\xdfe aus K\xf6ln")
    got = send_raw(deployment, data, mid)
    n = ticket_number(got)
    assert str(got["Subject"]) == f"[Support #{n}] Grüße aus Köln"


def test_header_injection_through_an_encoded_subject_is_flattened(deployment: Deployment) -> None:
    data, mid = raw_mail(b"=?utf-8?q?Hi=0D=0ABcc:_victim@customer.test?=")
    got = send_raw(deployment, data, mid)
    assert got.get_all("Bcc") is None
    assert str(got["Subject"]) == f"[Support #{ticket_number(got)}] Hi Bcc: victim@customer.test"


def test_broken_mime_is_delivered_untouched_with_its_ticket(deployment: Deployment) -> None:
    body = b"--nowhere\r\nContent-Type: text/plain\r\n\r\nhalf a part\r\n\xff\xfe junk\r\n"
    data, mid = raw_mail(b"Broken", extra=b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n", body=body)
    got = send_raw(deployment, data, mid)
    ticket_number(got)
    raw = next(r for r in deployment.stack.fetch_raw(SUPPORT) if mid.encode() in r)
    assert raw.split(b"\r\n\r\n", 1)[1] == body


def test_endless_headers_and_a_huge_references_list(deployment: Deployment) -> None:
    refs = b" ".join(f"<{i}.{uuid.uuid4().hex}@customer.test>".encode() for i in range(400))
    junk = b"".join(b"X-Junk-%d: %s\r\n" % (i, b"x" * 60) for i in range(500))
    data, mid = raw_mail(b"Re: " * 200 + b"Endless", extra=b"References: " + refs + b"\r\n" + junk)
    got = send_raw(deployment, data, mid)
    n = ticket_number(got)
    assert str(got["Subject"]).startswith("Re: ") and f"[Support #{n}]" in str(got["Subject"])
    assert len(got.get_all("X-Junk-499") or []) == 1


def test_crash_in_our_code_delivers_degraded_and_logs_the_queue_id(deployment: Deployment) -> None:
    d = deployment
    first = customer_mail("alice@customer.test", "Will break")
    n = ticket_number(deliver(d, first))
    # A ticket hash that our code cannot read (as a future bug or a hand edit would leave it).
    d.redis_client().hset(f"postroom:{{{SUPPORT}}}:t:{n}", "created", "not-a-number")
    answer = customer_mail("alice@customer.test", "Re: Will break", in_reply_to=str(first["Message-ID"]))
    got = deliver(d, answer)
    assert got["X-Postroom-Status"] == "degraded"
    assert got["Subject"] == "Re: Will break"
    qid = queue_id(d, str(answer["Message-ID"]))
    assert re.search(rf" {qid}: unexpected error in the pipeline", d.milter.log_text())
    assert "Traceback" in d.milter.log_text()
    d.redis_client().hset(f"postroom:{{{SUPPORT}}}:t:{n}", "created", "1")
