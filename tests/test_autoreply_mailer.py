"""The background mailer against a loopback SMTP server: sent, retried, refused, given up, never blocking."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from postroom.mailer import Mailer, OutgoingMail
from postroom_testbed import free_port

MAIL = OutgoingMail(
    mail_from="",
    rcpts=("alice@customer.test",),
    data=b"From: support@example.test\r\nTo: alice@customer.test\r\nSubject: ack\r\n\r\nThanks\r\n",
    cause_queue_id="4AbC12",
    what="auto-reply 'ack' for Support #17",
)


class Handler:
    def __init__(self) -> None:
        self.replies: list[str] = []  # what to answer to DATA, one per message; then 250
        self.received: list[Any] = []
        self.hold = False  # answer DATA only once `release` is set
        self.arrived = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.arrived.set()
        if self.hold:
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait)
        reply = self.replies.pop(0) if self.replies else "250 2.0.0 Ok: queued as 9XyZ"
        if reply.startswith("250"):
            self.received.append(envelope)
        return reply


@pytest.fixture
def server() -> Iterator[tuple[Handler, int]]:
    handler = Handler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_sends_with_the_null_sender_and_logs_both_queue_ids(
    server: tuple[Handler, int], caplog: pytest.LogCaptureFixture
) -> None:
    handler, port = server
    caplog.set_level(logging.INFO, "postroom.mailer")
    mailer = Mailer("127.0.0.1", port).start()
    assert mailer.submit(MAIL)
    assert mailer.flush(10)
    mailer.stop()
    assert len(handler.received) == 1
    envelope = handler.received[0]
    assert envelope.mail_from in {"<>", ""}
    assert envelope.rcpt_tos == ["alice@customer.test"]
    assert b"Subject: ack" in envelope.original_content
    sent = records(caplog, "sent: 2.0.0 Ok: queued as 9XyZ")
    assert sent and sent[0].queue_id == "4AbC12"  # type: ignore[attr-defined]
    assert mailer.sent == 1


def test_a_temporary_refusal_is_retried(server: tuple[Handler, int], caplog: pytest.LogCaptureFixture) -> None:
    handler, port = server
    handler.replies = ["451 4.3.0 try again later"]
    mailer = Mailer("127.0.0.1", port, retry_delays=[0.05]).start()
    mailer.submit(MAIL)
    assert mailer.flush(10)
    mailer.stop()
    assert len(handler.received) == 1
    assert records(caplog, "try 1 failed")[0].queue_id == "4AbC12"  # type: ignore[attr-defined]


def test_a_permanent_refusal_is_not_retried(server: tuple[Handler, int], caplog: pytest.LogCaptureFixture) -> None:
    handler, port = server
    handler.replies = ["550 5.7.1 no thanks", "550 5.7.1 no thanks"]
    mailer = Mailer("127.0.0.1", port, retry_delays=[0.01]).start()
    mailer.submit(MAIL)
    assert mailer.flush(10)
    mailer.stop()
    assert handler.received == []
    assert handler.replies == ["550 5.7.1 no thanks"]  # asked once only
    refused = records(caplog, "refused by 127.0.0.1")
    assert refused and "550 5.7.1 no thanks" in refused[0].getMessage()
    assert refused[0].queue_id == "4AbC12"  # type: ignore[attr-defined]
    assert mailer.failed == 1


def test_an_unreachable_postfix_is_given_up_after_the_configured_tries(caplog: pytest.LogCaptureFixture) -> None:
    mailer = Mailer("127.0.0.1", free_port(), attempts=3, retry_delays=[0.01], timeout=2).start()
    mailer.submit(MAIL)
    assert mailer.flush(10)
    mailer.stop()
    given_up = records(caplog, "given up after 3 tries")
    assert len(given_up) == 1 and given_up[0].levelno == logging.ERROR
    assert given_up[0].queue_id == "4AbC12"  # type: ignore[attr-defined]
    assert len(records(caplog, "failed")) == 2  # two warnings before the error


def test_submit_never_waits_for_a_slow_server_or_a_full_queue(
    server: tuple[Handler, int], caplog: pytest.LogCaptureFixture
) -> None:
    handler, port = server
    handler.hold = True
    mailer = Mailer("127.0.0.1", port, queue_size=2).start()
    try:
        assert mailer.submit(MAIL)
        assert handler.arrived.wait(10)  # the mailer's thread is inside DATA, held by the server
        results: list[bool] = []
        submitter = threading.Thread(target=lambda: results.extend(mailer.submit(MAIL) for _ in range(9)))
        submitter.start()
        submitter.join(10)
        # Had submit waited for the held server or for room in the queue, it would still be waiting.
        assert not submitter.is_alive()
    finally:
        handler.release.set()
    # Two wait in the queue behind the one being sent; the rest are dropped and say so.
    assert results == [True, True] + [False] * 7
    dropped = records(caplog, "dropped: the mailer queue is full")
    assert len(dropped) == 7 and dropped[0].queue_id == "4AbC12"  # type: ignore[attr-defined]
    mailer.stop(timeout=10)
    assert len(handler.received) == 3
