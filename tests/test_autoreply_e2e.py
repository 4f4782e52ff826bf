"""Auto-replies end to end: planned, sent by the mailer through a real Postfix, read from the customer's IMAP INBOX.

The full inbound story (a customer's mail through the milter producing the acknowledgement) is the pipeline's
test; this one proves the half that is the auto-reply's: what leaves, how, and that the cap holds in real Redis.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from postroom.autoreply import AutoReplyPlan, load_templates, plan_auto_reply
from postroom.config import Config, example_config_path, load_config, parse_config
from postroom.dkim import Keyring, public_txt
from postroom.mailer import Mailer
from postroom.store.assignment import RedisAssignmentState
from postroom_testbed import MailUser, Stack
from tests.dkim_check import assert_verified

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(b, path="/usr/sbin:/usr/bin") for b in ("postfix", "dovecot")),
        reason="needs root and the postfix, dovecot and redis-server packages",
    ),
]

ALICE = "alice@customer.test"
BOB = "bob@customer.test"
OPEN = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)  # Monday 10:00 in Berlin


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(users=[MailUser(ALICE), MailUser(BOB), MailUser("support@example.test")]) as s:
        yield s


def config_for(stack: Stack) -> Config:
    data = load_config(example_config_path(), environ={}).model_dump()
    data["autoreply"] = {**data["autoreply"], "acknowledge": True}
    data["mailer"] = {**data["mailer"], "port": stack.postfix.smtp_port}
    data["redis"] = {**data["redis"], "url": stack.redis.url}
    return parse_config(data, environ={})


def plan(config: Config, cap: RedisAssignmentState, sender: str, number: int, lang: str = "en") -> AutoReplyPlan:
    return plan_auto_reply(
        config,
        load_templates(config),
        Keyring.from_config(config),
        cap,
        mailbox="support",
        ticket=number,
        new_ticket=True,
        rule_template="",
        headers=[
            ("From", sender),
            ("To", "support@example.test"),
            ("Subject", f"Question {number}"),
            ("Message-ID", f"<q{number}@customer.test>"),
            ("Content-Language", lang),
        ],
        envelope_sender=sender,
        queue_id=f"4Q{number}",
        now=OPEN,
    )


def test_the_acknowledgement_reaches_the_customer_signed_threaded_and_in_their_language(stack: Stack) -> None:
    config = config_for(stack)
    cap = RedisAssignmentState.from_url(stack.redis.url, key_prefix="postroom", timeout=2)
    result = plan(config, cap, ALICE, 17, "nl")
    assert result.mail is not None
    mailer = Mailer.from_config(config).start()
    try:
        assert mailer.submit(result.mail)
        assert mailer.flush(30)
    finally:
        mailer.stop()
    [msg] = stack.wait_for(ALICE, "INBOX", 1)
    assert msg["From"] == "Support <support@example.test>"
    assert msg["Subject"] == "Re: [Support #17] Question 17"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<q17@customer.test>"
    assert msg["Return-Path"] == "<>"  # the null sender: nothing bounces back to support@
    assert msg["Message-ID"] == f"<{result.message_id}>"
    assert "We hebben het geregistreerd als [Support #17]" in msg.get_content().replace("\n", " ")
    raw = stack.fetch_raw(ALICE)[0]
    key = config.dkim["example.test"]
    pem = Keyring.from_config(config).for_address("support@example.test")
    assert pem is not None
    record = {f"{key.selector}._domainkey.example.test.": public_txt(pem.private_pem)}
    assert_verified(raw, record)


def test_the_daily_cap_holds_in_redis(stack: Stack) -> None:
    config = config_for(stack)
    cap = RedisAssignmentState.from_url(stack.redis.url, key_prefix="postroom", timeout=2)
    plans = [plan(config, cap, BOB, 100 + i) for i in range(7)]
    assert [p.mail is not None for p in plans] == [True] * 5 + [False] * 2
    assert plans[-1].reason == "not answered: bob@customer.test reached the cap of 5 a day"
    mailer = Mailer.from_config(config).start()
    try:
        for p in plans:
            if p.mail is not None:
                mailer.submit(p.mail)
        assert mailer.flush(30)
    finally:
        mailer.stop()
    stack.wait_for(BOB, "INBOX", 5)
    stack.postfix.wait_queue_empty()
    subjects = sorted(str(m["Subject"]) for m in stack.fetch(BOB))
    assert subjects == [f"Re: [Support #{n}] Question {n}" for n in range(100, 105)]
