"""The demo's development SMTP server, driven by smtplib: AUTH gives an agent's identity, mail without it is a
customer's, and a refused verdict reaches the client with its own text.  The store is the in-memory fake."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from postroom.config import example_config_path, load_config
from postroom.dkim import Keyring
from postroom.parts import Parts
from postroom.runtime import Runtime
from postroom.smtpd.devserver import DEMO_PASSWORD, DevServer
from postroom.store.memory import MemoryStore
from postroom_testbed import free_port

SUPPORT = "support@example.test"
ALICE = "alice@customer.test"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DevServer]:
    config = load_config(example_config_path(), environ={})
    runtime = Runtime(Parts(config, MemoryStore(), keys=Keyring.from_config(config)))
    with DevServer(runtime, tmp_path / "maildir", free_port()) as dev:
        yield dev


def _mail(sender: str, to: str, subject: str, in_reply_to: str = "") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{abs(hash((sender, subject)))}@test>"
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    msg.set_content("Hello\n")
    return msg


def _send(dev: DevServer, msg: EmailMessage, login: str = "", password: str = DEMO_PASSWORD) -> None:
    with smtplib.SMTP(dev.host, dev.port, timeout=10) as smtp:
        if login:
            smtp.login(login, password)
        smtp.send_message(msg)


def test_mail_without_auth_is_customer_mail_even_from_an_agents_address(server: DevServer) -> None:
    _send(server, _mail("meier@example.test", SUPPORT, "I am Meier, honestly"))
    got = server.maildirs.messages(SUPPORT, "INBOX")
    assert [str(m["Subject"]) for m in got] == ["[Support #1] I am Meier, honestly"]
    assert str(got[0]["X-Postroom-Owner"]).startswith("unassigned")


def test_auth_gives_the_agents_identity_and_the_reply_leaves_as_the_shared_address(server: DevServer) -> None:
    _send(server, _mail(ALICE, SUPPORT, "Printer on fire"))
    first = server.maildirs.messages(SUPPORT, "INBOX")[0]
    _send(server, _mail("meier@example.test", ALICE, f"Re: {first['Subject']}", str(first["Message-ID"])), "meier")
    reply = server.maildirs.messages(ALICE, "INBOX")[0]
    assert str(reply["From"]) == "Meier via Support <support@example.test>"
    assert "DKIM-Signature" in reply
    # The team copy is filed into the owner's folder of the shared mailbox, as Dovecot would file support+Meier@.
    assert [str(m["Subject"]) for m in server.maildirs.messages(SUPPORT, "Meier")] == [str(reply["Subject"])]
    assert server.maildirs.tree() == {ALICE: {"INBOX": 1}, SUPPORT: {"INBOX": 1, "Meier": 1}}


def test_a_wrong_password_or_an_unknown_login_is_refused(server: DevServer) -> None:
    for login, password in (("meier", "wrong"), ("nobody", DEMO_PASSWORD)):
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            _send(server, _mail("x@example.test", ALICE, "hi"), login, password)
        assert exc.value.smtp_code == 535


def test_a_rejected_verdict_answers_data_with_its_own_reply(server: DevServer) -> None:
    _send(server, _mail(ALICE, SUPPORT, "Printer on fire"))
    first = server.maildirs.messages(SUPPORT, "INBOX")[0]
    _send(server, _mail("meier@example.test", ALICE, f"Re: {first['Subject']}", str(first["Message-ID"])), "meier")
    rival = _mail("mueller@example.test", ALICE, f"Re: {first['Subject']}", str(first["Message-ID"]))
    with pytest.raises(smtplib.SMTPDataError) as exc:
        _send(server, rival, "mueller")
    assert exc.value.smtp_code == 550
    error = exc.value.smtp_error
    text = error.decode() if isinstance(error, bytes) else error
    assert text.startswith("5.7.1 postroom: [Support #1] belongs to Meier since ")
    assert "#takeover" in text
    # Nothing of the refused reply was filed.
    assert len(server.maildirs.messages(ALICE, "INBOX")) == 1
