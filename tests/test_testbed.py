"""The private mail stack itself, without any milter: mail in over SMTP, out over IMAP."""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope

from postroom_testbed import Login, MailUser, RedisServer, Stack, StackError, imap_quote, pid_alive

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(b, path="/usr/sbin:/usr/bin") for b in ("postfix", "dovecot")),
        reason="needs root and the postfix, dovecot and redis-server packages",
    ),
]

SUPPORT = "support@example.test"
ALICE = "alice@customer.test"
USERS = [MailUser(SUPPORT), MailUser(ALICE)]
MEIER = Login("meier")


def _message(subject: str, to: str, sender: str = "bob@outside.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@outside.test>"
    msg.set_content(f"Body of {subject}\n")
    return msg


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # One stack for the mail-flow tests: each test uses its own subject, so they don't interfere.
    with Stack(users=USERS, logins=[MEIER]) as running:
        yield running


def _subjects(stack: Stack, address: str, folder: str, count: int) -> list[str]:
    return [str(m["Subject"]) for m in stack.wait_for(address, folder, count)]


def test_mail_to_support_arrives_in_inbox(stack: Stack) -> None:
    refused = stack.send(_message("plain inbound", SUPPORT), mail_from="bob@outside.test", rcpts=[SUPPORT])

    assert refused == {}
    assert "plain inbound" in _subjects(stack, SUPPORT, "INBOX", 1)
    stack.postfix.wait_queue_empty(timeout=10)


def test_detail_address_arrives_in_its_folder(stack: Stack) -> None:
    to = "support+Meier@example.test"
    stack.send(_message("for meier", to), mail_from="bob@outside.test", rcpts=[to])

    [msg] = stack.wait_for(SUPPORT, "Meier", 1)
    assert msg["Subject"] == "for meier"
    assert msg.get_content() == "Body of for meier\n"
    assert "Meier" in stack.folders(SUPPORT)
    assert "for meier" not in [str(m["Subject"]) for m in stack.fetch(SUPPORT)]


def test_raw_bytes_with_bare_newlines_are_sent(stack: Stack) -> None:
    raw = b"From: bob@outside.test\nTo: support@example.test\nSubject: raw bytes\n\nline one\n.leading dot\n"
    stack.send(raw, mail_from="bob@outside.test", rcpts=[SUPPORT])

    stack.postfix.wait_queue_empty(timeout=10)
    [msg] = [m for m in stack.fetch(SUPPORT) if m["Subject"] == "raw bytes"]
    assert msg.get_content() == "line one\n.leading dot\n"
    [stored] = [r for r in stack.fetch_raw(SUPPORT) if b"Subject: raw bytes\r\n" in r]
    assert stored.endswith(b"\r\n\r\nline one\r\n.leading dot\r\n")


def test_authenticated_submission_is_delivered(stack: Stack) -> None:
    msg = _message("reply from staff", ALICE, sender=SUPPORT)
    refused = stack.send(msg, mail_from=SUPPORT, rcpts=[ALICE], login=MEIER)

    assert refused == {}
    assert "reply from staff" in _subjects(stack, ALICE, "INBOX", 1)
    assert "sasl_username=meier" in stack.postfix.log_text()


def test_unauthenticated_relay_is_refused(stack: Stack) -> None:
    msg = _message("relay attempt", "victim@elsewhere.test")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        stack.send(msg, mail_from="spammer@outside.test", rcpts=["victim@elsewhere.test"])

    code, text = refused.value.recipients["victim@elsewhere.test"]
    assert code == 554
    assert b"Relay access denied" in text


def test_submission_port_requires_auth(stack: Stack) -> None:
    msg = _message("no auth", ALICE, sender=SUPPORT)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        stack.send(msg, mail_from=SUPPORT, rcpts=[ALICE], port=stack.postfix.submission_port)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        stack.send(msg, mail_from=SUPPORT, rcpts=[ALICE], login=Login("meier", "wrong"))


def test_unknown_mailbox_is_refused(stack: Stack) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        stack.send(
            _message("nobody", "nobody@example.test"), mail_from="bob@outside.test", rcpts=["nobody@example.test"]
        )
    assert refused.value.recipients["nobody@example.test"][0] == 550


def test_wait_for_timeout_explains(stack: Stack) -> None:
    with pytest.raises(StackError) as error:
        stack.wait_for(SUPPORT, "Never", 1, timeout=0.3)

    text = str(error.value)
    assert "'Never'" in text
    assert "INBOX" in text  # the folder list
    assert "postfix.log" in text


def test_stack_leaves_nothing_behind() -> None:
    # Two stacks at once: separate dirs, ports and processes, and each cleans up after itself.
    with Stack(users=USERS) as first, Stack(users=USERS, milter="auto") as second:
        roots = [first.root, second.root]
        pids = first.process_ids() + second.process_ids()
        assert first.root != second.root
        assert first.postfix.smtp_port != second.postfix.smtp_port
        assert first.redis.is_running() and second.redis.is_running()
        # no milter listens yet: Postfix applies milter_default_action = accept
        second.send(_message("to second", SUPPORT), mail_from="bob@outside.test", rcpts=[SUPPORT])
        first.send(_message("to first", SUPPORT), mail_from="bob@outside.test", rcpts=[SUPPORT])
        assert [m["Subject"] for m in second.wait_for(SUPPORT, "INBOX", 1)] == ["to second"]
        assert [m["Subject"] for m in first.wait_for(SUPPORT, "INBOX", 1)] == ["to first"]
        assert f"smtpd_milters = {second.milter_spec}" in (second.root / "postfix/etc/main.cf").read_text()

    assert len(pids) >= 6  # redis, dovecot master and children, postfix master and children
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert not any(root.exists() for root in roots)


def test_failed_start_cleans_up() -> None:
    stack = Stack(users=USERS, main_cf={"mail_owner": "no-such-user-postroom"})
    with pytest.raises(StackError) as error:
        stack.start()

    assert "no-such-user-postroom" in str(error.value)  # the reason, from Postfix's log
    assert stack.redis.pid is not None and not pid_alive(stack.redis.pid)
    assert stack.dovecot.pid is not None and not pid_alive(stack.dovecot.pid)
    assert not stack.root.exists()


def test_port_taken_meanwhile_is_replaced(tmp_path: Path) -> None:
    # free_port() cannot reserve a port; a service that finds it taken starts on a new one.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        redis = RedisServer(tmp_path)
        redis.port = taken
        try:
            redis.start()
            assert redis.port != taken
            assert redis.is_running()
        finally:
            redis.stop()
    assert redis.pid is not None and not pid_alive(redis.pid)


def test_imap_folder_names_are_quoted_in_modified_utf7() -> None:
    assert imap_quote("Meier") == '"Meier"'
    assert imap_quote('Müller & "Co"') == '"M&APw-ller &- \\"Co\\""'
    assert imap_quote("台北") == '"&U,BTFw-"'  # RFC 3501's example


class _PassThrough:
    """The smallest after-queue content filter: hands every mail back to Postfix's re-injection listener."""

    def __init__(self, reinject_port: int) -> None:
        self.reinject_port = reinject_port
        self.seen: list[str] = []

    async def handle_DATA(self, server: object, session: object, envelope: Envelope) -> str:
        self.seen.append(str(envelope.mail_from))
        with smtplib.SMTP("127.0.0.1", self.reinject_port, timeout=10) as smtp:
            smtp.sendmail(envelope.mail_from or "", envelope.rcpt_tos, envelope.original_content or b"")
        return "250 OK handed back"


def test_after_queue_stack_keeps_mail_until_a_filter_hands_it_back() -> None:
    with Stack(users=USERS, logins=[MEIER], filter="after-queue") as stack:
        assert stack.postfix.milter is None
        stack.send(_message("filtered later", SUPPORT), mail_from="bob@outside.test", rcpts=[SUPPORT])
        # No filter listens yet: Postfix keeps the mail queued, it does not deliver it unfiltered.
        deadline = time.monotonic() + 10
        while "status=deferred" not in stack.postfix.log_text():
            assert time.monotonic() < deadline, stack.postfix.log_tail()
            time.sleep(0.1)
        assert stack.dovecot.is_running() and not stack.postfix.queue_empty()
        passthrough = _PassThrough(stack.reinject_port)
        controller = Controller(passthrough, hostname="127.0.0.1", port=stack.filter_port)
        controller.start()
        try:
            stack.postfix.flush()
            assert "filtered later" in _subjects(stack, SUPPORT, "INBOX", 1)
            # The agent's login reached the filter only because the submission listener writes it for it.
            stack.send(_message("agent reply", ALICE, SUPPORT), mail_from=SUPPORT, rcpts=[ALICE], login=MEIER)
            raw = next(r for r in _raw_when(stack, ALICE, 1) if b"agent reply" in r)
            assert b"(Authenticated sender: meier)" in raw
        finally:
            controller.stop()
        assert passthrough.seen == ["bob@outside.test", SUPPORT]


def _raw_when(stack: Stack, address: str, count: int) -> list[bytes]:
    stack.wait_for(address, "INBOX", count)
    return stack.fetch_raw(address)


def test_a_stack_runs_a_milter_or_an_after_queue_filter_not_both() -> None:
    with pytest.raises(ValueError, match="not both"):
        Stack(users=USERS, milter="auto", filter="after-queue")
    with pytest.raises(ValueError, match="after-queue"):
        Stack(users=USERS, filter="before-queue")
