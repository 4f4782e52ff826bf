"""The after-queue filter as Postfix sees it: a real loopback server driven by smtplib, handing mail back to a
loopback stand-in for Postfix's re-injection listener.  The store is the in-memory fake; the pipeline is real.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from postroom.config import Config, example_config_path, load_config, with_changes
from postroom.dkim import Keyring
from postroom.parts import Parts
from postroom.runtime import Runtime
from postroom.smtpd import FilterHandler, serve
from postroom.smtpd.server import ReinjectionError, connect
from postroom.store.memory import MemoryStore
from postroom.tickets import NewTicket
from postroom_testbed import free_port

SUPPORT = "support@example.test"
ALICE = "alice@customer.test"


def received(login: str = "", qid: str = "4AbC12", rcpt: str = SUPPORT) -> bytes:
    """The Received header Postfix puts on top (with the login when smtpd_sasl_authenticated_header = yes)."""
    auth = f"\t(Authenticated sender: {login})\r\n" if login else ""
    proto = "ESMTPSA" if login else "ESMTP"
    return (
        "Received: from client.test (localhost [127.0.0.1])\r\n"
        f"{auth}\tby mx.example.test (Postfix) with {proto} id {qid}\r\n"
        f"\tfor <{rcpt}>; Tue,  3 Jun 2025 10:00:00 +0200 (CEST)\r\n"
    ).encode()


def customer_mail(subject: str = "Printer on fire", extra: bytes = b"") -> bytes:
    return (
        received()
        + b"From: Alice <alice@customer.test>\r\nTo: support@example.test\r\n"
        + f"Subject: {subject}\r\nMessage-ID: <m1@customer.test>\r\n".encode()
        + extra
        + b"\r\nHello team\r\n"
    )


@dataclass
class Postfix:
    """Stands in for Postfix's 10026 listener: takes mail, or refuses it the way a test asks."""

    mails: list[Envelope] = field(default_factory=list)
    xforward: list[str] = field(default_factory=list)
    rcpt_reply: str = ""
    data_reply: str = ""

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-XFORWARD NAME ADDR PROTO HELO IDENT", responses[-1]]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        self.mails.append(envelope)
        return f"250 2.0.0 Ok: queued as Q{len(self.mails)}"


class _XforwardSMTP(SMTP):
    line_length_limit = 1 << 16  # Postfix's smtpd takes long lines (and splits them itself)

    async def smtp_XFORWARD(self, arg: str) -> None:
        self.event_handler.xforward.append(arg)
        await self.push("250 2.0.0 Ok")


class _PostfixController(Controller):
    def factory(self) -> SMTP:
        return _XforwardSMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class Filter:
    config: Config
    store: MemoryStore
    postfix: Postfix
    controller: Controller
    postfix_running: bool = True

    def stop_postfix(self) -> None:
        self.controller.stop()
        self.postfix_running = False

    def send(self, data: bytes, *, mail_from: str = ALICE, rcpts: tuple[str, ...] = (SUPPORT,)) -> tuple[int, str]:
        """Deliver like Postfix's smtp client (with XFORWARD); (code, text) of the filter's final answer."""
        with smtplib.SMTP("127.0.0.1", self.config.smtpd.listen_port, timeout=30) as smtp:
            smtp.ehlo("mx.example.test")
            assert smtp.has_extn("xforward")
            assert smtp.docmd("XFORWARD", "NAME=client.test ADDR=127.0.0.1 IDENT=4AbC12")[0] == 250
            try:
                smtp.sendmail(mail_from, list(rcpts), data)
            except smtplib.SMTPResponseException as exc:
                text = exc.smtp_error.decode() if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
                return exc.smtp_code, text
            except smtplib.SMTPRecipientsRefused as exc:
                code, raw = next(iter(exc.recipients.values()))
                return code, raw.decode()
        return 250, ""

    def final_reply(self, data: bytes, **kwargs: Any) -> str:
        """The filter's 250 text (smtplib keeps it nowhere public): sent by hand."""
        with smtplib.SMTP("127.0.0.1", self.config.smtpd.listen_port, timeout=30) as smtp:
            smtp.ehlo("mx.example.test")
            smtp.mail(ALICE)
            smtp.rcpt(SUPPORT)
            code, text = smtp.data(data)
            return f"{code} {text.decode()}"


@pytest.fixture
def postroom_filter() -> Iterator[Filter]:
    postfix = Postfix()
    controller = _PostfixController(postfix, hostname="127.0.0.1", port=free_port())
    controller.start()
    base = load_config(example_config_path(), environ={})
    config = with_changes(base, {"smtpd": {"listen_port": free_port(), "reinject_port": controller.port}})
    store = MemoryStore()
    runtime = Runtime(Parts(config, store, keys=Keyring.from_config(config)))
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()

    async def main() -> None:
        ready.set()
        await serve(FilterHandler(runtime), stop)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(5)
    _wait_listening(config.smtpd.listen_port)
    f = Filter(config, store, postfix, controller)
    try:
        yield f
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
        if f.postfix_running:
            controller.stop()


def _wait_listening(port: int) -> None:
    for _ in range(100):
        try:
            smtplib.SMTP("127.0.0.1", port, timeout=1).quit()
            return
        except OSError:
            threading.Event().wait(0.05)
    raise AssertionError(f"filter not listening on {port}")


def test_mail_is_acknowledged_only_once_postfix_has_it_back(postroom_filter: Filter) -> None:
    f = postroom_filter
    reply = f.final_reply(customer_mail())
    # Postfix logs this under the first queue id, so the admin finds the second one.
    assert reply == "250 2.0.0 postroom: handed back to Postfix as Q1"
    [mail] = f.postfix.mails
    assert mail.rcpt_tos == [SUPPORT]
    assert b"\r\nSubject: [Support #1] Printer on fire\r\n" in (mail.original_content or b"")
    assert b"\r\nX-Postroom-Ticket: 1 (Support)\r\n" in (mail.original_content or b"")
    assert (mail.original_content or b"").endswith(b"\r\n\r\nHello team\r\n")


def test_xforward_is_passed_on_so_postfix_logs_the_real_client(postroom_filter: Filter) -> None:
    f = postroom_filter
    assert f.send(customer_mail()) == (250, "")
    assert f.postfix.xforward == ["NAME=client.test ADDR=127.0.0.1 IDENT=4AbC12"]


def test_postfix_not_listening_answers_451_and_no_ticket_is_opened(postroom_filter: Filter) -> None:
    f = postroom_filter
    f.stop_postfix()
    code, text = f.send(customer_mail())
    assert code == 451
    assert text.startswith("4.3.0 postroom: Postfix did not take the mail back")
    # The pipeline never ran: Postfix's retry must not find a ticket this mail half opened.
    assert f.store.tickets(SUPPORT) == []


@pytest.mark.parametrize(
    ("where", "reply"),
    [("rcpt_reply", "550 5.1.1 no such user"), ("rcpt_reply", "452 4.3.1 full"), ("data_reply", "554 5.6.0 no")],
)
def test_any_refusal_by_postfix_keeps_the_mail_queued(postroom_filter: Filter, where: str, reply: str) -> None:
    f = postroom_filter
    setattr(f.postfix, where, reply)
    code, text = f.send(customer_mail())
    # 451, never the 5xx itself: Postfix would bounce the customer's mail for a problem between us and Postfix.
    assert code == 451 and reply in text
    assert f.postfix.mails == []


def test_rival_reply_is_refused_with_the_owners_name(postroom_filter: Filter) -> None:
    f = postroom_filter
    f.store.open(SUPPORT, NewTicket(ALICE, "Refund", (ALICE,), ("m0@customer.test",), owner="meier"), 0.0)
    data = (
        received(login="mueller", rcpt=ALICE)
        + b"From: mueller@example.test\r\nTo: alice@customer.test\r\nSubject: Re: [Support #1] Refund\r\n"
        + b"In-Reply-To: <m0@customer.test>\r\nMessage-ID: <r1@example.test>\r\n\r\nMine now.\r\n"
    )
    code, text = f.send(data, mail_from="mueller@example.test", rcpts=(ALICE,))
    assert code == 550
    assert text.startswith("5.7.1 postroom: [Support #1] belongs to Meier since")
    assert f.postfix.mails == []


def test_agents_reply_leaves_rewritten_without_the_login_in_its_headers(postroom_filter: Filter) -> None:
    f = postroom_filter
    f.store.open(SUPPORT, NewTicket(ALICE, "Refund", (ALICE,), ("m0@customer.test",)), 0.0)
    data = (
        received(login="meier", rcpt=ALICE)
        + b"From: Meier <meier@example.test>\r\nTo: alice@customer.test\r\nSubject: Re: Refund\r\n"
        + b"In-Reply-To: <m0@customer.test>\r\nMessage-ID: <r2@example.test>\r\n\r\nDone.\r\n"
    )
    assert f.send(data, mail_from="meier@example.test", rcpts=(ALICE,)) == (250, "")
    [mail] = f.postfix.mails
    content = mail.original_content or b""
    assert mail.mail_from == SUPPORT
    assert mail.rcpt_tos == [ALICE, "support+Meier@example.test"]
    assert b'\r\nFrom: "Meier via Support" <support@example.test>\r\n' in content
    assert content.startswith(b"DKIM-Signature: ")
    # Neither the agent's address nor the login Postfix wrote into its Received header reaches the customer.
    assert b"meier@example.test" not in content and b"Authenticated sender" not in content


def test_a_customers_forged_login_claim_is_mail_from_a_customer(postroom_filter: Filter) -> None:
    f = postroom_filter
    forged = (
        b"Received: from evil.test (evil.test [192.0.2.66])\r\n\t(Authenticated sender: meier)\r\n"
        b"\tby mx.evil.test (Postfix) with ESMTPSA id 1111\r\n\tfor <alice@customer.test>; Tue, 3 Jun 2025\r\n"
    )
    data = received(rcpt=ALICE) + forged + b"From: support@example.test\r\nSubject: Pay here\r\n\r\nIBAN\r\n"
    assert f.send(data, mail_from="support@example.test", rcpts=(ALICE,)) == (250, "")
    [mail] = f.postfix.mails
    content = mail.original_content or b""
    assert b"\r\nFrom: support@example.test\r\n" in content and b"DKIM-Signature" not in content
    assert b"Authenticated sender" not in content


def test_lines_longer_than_smtps_limit_are_taken_not_bounced(postroom_filter: Filter) -> None:
    f = postroom_filter
    long_refs = b" ".join(b"<%d.x@customer.test>" % i for i in range(200))
    assert len(long_refs) > 1000
    assert f.send(customer_mail(extra=b"X-Long: " + long_refs + b"\r\n")) == (250, "")
    assert long_refs in (f.postfix.mails[0].original_content or b"")


def test_null_sender_mail_goes_through_with_its_null_sender(postroom_filter: Filter) -> None:
    # Bounces and auto-replies to support@ come from <>; re-injected from anyone else they could loop.
    f = postroom_filter
    assert f.send(customer_mail("Undelivered Mail Returned to Sender"), mail_from="") == (250, "")
    [mail] = f.postfix.mails
    assert mail.mail_from == "<>"


def test_a_busy_postfix_greeting_421_is_a_failed_reinjection() -> None:
    # smtplib hands back a 421 greeting instead of raising: it must not count as a Postfix ready for the mail.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def greet_busy() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"421 4.3.2 Service shutting down\r\n")

    thread = threading.Thread(target=greet_busy, daemon=True)
    thread.start()
    config = with_changes(load_config(example_config_path(), environ={}), {"smtpd": {"reinject_port": port}})
    with pytest.raises(ReinjectionError, match=r"greeted with 421 4\.3\.2 Service shutting down"):
        connect(config.smtpd)
    thread.join(5)
    listener.close()
