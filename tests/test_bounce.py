"""Delivery reports (DSNs, Exchange NDRs, old returned-mail bounces): read, and joined to the ticket they report on.

The fixtures in tests/fixtures/bounces follow real reports of Postfix, Exchange Online, sendmail and Lotus Domino
with our reply's Message-ID put in; CPython's email test data adds the real reports it ships.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom.autoreply import load_templates
from postroom.bounce import might_be_report, read_report
from postroom.config import Config, example_config_path, load_config, parse_config
from postroom.inbound import DELIVERY_HEADER
from postroom.parts import Parts
from postroom.pipeline import Message, Outcome, process
from postroom.rules import MemoryAssignmentState
from postroom.smtpd.message import parse
from postroom.store.memory import MemoryStore
from postroom.verdict import AddHeader, AddRecipient, Envelope, RemoveRecipient, SetHeader
from tests.corpus import corpus_file

SUPPORT = "support@example.test"
FIXTURES = Path(__file__).parent / "fixtures" / "bounces"
ALL = sorted(p.name for p in FIXTURES.glob("*.eml"))
REPLY_ID = "postroom.4f9a0c1e@example.test"
CUSTOMER_ID = "m1@customer.test"


def fixture(
    name: str, *, reply_id: str = REPLY_ID, customer_id: str = CUSTOMER_ID, rcpt: str = "alice@customer.test"
) -> bytes:
    text = (FIXTURES / name).read_text()
    for key, value in {
        "{REPLY_ID}": reply_id,
        "{CUSTOMER_ID}": customer_id,
        "{RCPT}": rcpt,
        "{RCPT_LOCAL}": rcpt.partition("@")[0],
        "{TICKET}": "1",
    }.items():
        text = text.replace(key, value)
    return text.replace("\n", "\r\n").encode()


def as_message(data: bytes, mail_from: str = "<>", qid: str = "B0UNCE") -> Message:
    raw = parse(data)
    return Message(Envelope(mail_from, [f"<{SUPPORT}>"], queue_id=qid), raw.headers, body=lambda: raw.body)


@pytest.fixture
def config() -> Config:
    data = load_config(example_config_path(), environ={}).model_dump()
    data["autoreply"] = {**data["autoreply"], "acknowledge": True}
    return parse_config(data, environ={})


def parts(config: Config, store: MemoryStore, state: MemoryAssignmentState) -> Parts:
    return Parts(config, store, templates=load_templates(config), assign=state)


def values(out: Outcome, name: str) -> list[str]:
    return [e.value for e in out.verdict.edits if isinstance(e, AddHeader | SetHeader) and e.name == name]


@pytest.mark.parametrize("name", ALL)
def test_each_kind_of_report_names_our_reply_and_the_failed_recipient(name: str) -> None:
    raw = parse(fixture(name))
    report = read_report("<>", raw.headers, raw.body)
    assert report is not None
    assert report.message_ids[-1] == REPLY_ID
    if name != "old-style-returned.eml":  # Domino says it only in prose
        assert report.failures[0][:2] == ("alice@customer.test", "failed")
        assert report.summary().startswith("failed alice@customer.test 5.")


def test_a_customer_forwarding_our_reply_as_an_attachment_is_no_bounce() -> None:
    raw = parse(fixture("old-style-returned.eml"))
    assert not might_be_report("<alice@customer.test>", [(k, v) for k, v in raw.headers if k != "From"])
    assert read_report("<alice@customer.test>", [(k, v) for k, v in raw.headers if k != "From"], raw.body) is None


@pytest.mark.parametrize("name", ["msg_16.txt", "msg_25.txt", "msg_43.txt"])
def test_the_reports_in_cpythons_email_test_data_are_read(name: str) -> None:
    raw = parse(corpus_file(name).read_bytes())
    report = read_report("<>", raw.headers, raw.body)
    # msg_25's returned headers carry no Message-ID, msg_43 returns none at all: nothing to look up, so no
    # report to act on; msg_16 returns a whole mail with its Message-ID.
    if name == "msg_16.txt":
        assert report is not None and report.failures and report.message_ids
    else:
        assert report is None or report.message_ids


def _ticket_with_reply(config: Config) -> tuple[MemoryStore, MemoryAssignmentState]:
    store, state = MemoryStore(), MemoryAssignmentState()
    headers = [("From", "alice@customer.test"), ("Subject", "Printer on fire"), ("Message-ID", f"<{CUSTOMER_ID}>")]
    first = Message(Envelope("<alice@customer.test>", [f"<{SUPPORT}>"], queue_id="Q1"), headers)
    process(first, parts(config, store, state), 1000.0)
    store.assign(SUPPORT, 1, "meier", 1005.0)
    # Meier's reply went out through postroom, which indexed its Message-ID to the ticket.
    store.touch(SUPPORT, 1, [REPLY_ID], ["alice@customer.test"], 1010.0)
    return store, state


@pytest.mark.parametrize("name", ALL)
def test_a_bounce_of_an_agents_reply_joins_its_ticket_in_the_owners_folder(config: Config, name: str) -> None:
    store, state = _ticket_with_reply(config)
    out = process(as_message(fixture(name)), parts(config, store, state), 1020.0)
    assert values(out, "X-Postroom-Ticket") == ["1 (Support)"]
    assert store.seq[SUPPORT] == 1  # no new ticket
    assert ("AddRecipient", "support+Meier@example.test") in [
        (type(e).__name__, e.address) for e in out.verdict.edits if isinstance(e, AddRecipient | RemoveRecipient)
    ]
    assert out.outgoing == []  # never acknowledged
    [rec] = out.records
    if name == "old-style-returned.eml":
        assert rec.event == "delivery_report" and values(out, DELIVERY_HEADER) == []
    else:
        assert rec.event == "delivery_failure"
        [failure] = values(out, DELIVERY_HEADER)
        assert failure.startswith("failed alice@customer.test 5.") and failure.endswith("(Support #1)")
    # The token is there (Exchange's "Undeliverable: Re: [Support #1] ..." already carries it and stays as it is).
    message = as_message(fixture(name))
    assert "[Support #1]" in (values(out, "Subject") or [str(message.header("Subject"))])[0]


def test_a_bounce_of_a_mail_we_never_sent_opens_no_ticket(config: Config) -> None:
    store, state = _ticket_with_reply(config)
    # Backscatter: a spammer forged our address; the report names mail we never sent.
    data = fixture("postfix-dsn.eml", reply_id="forged.1@example.test", customer_id="forged.0@spam.test")
    out = process(as_message(data), parts(config, store, state), 1020.0)
    assert store.seq[SUPPORT] == 1 and out.records == [] and out.outgoing == []
    [failure] = values(out, DELIVERY_HEADER)
    assert "no ticket" in failure
    assert values(out, "X-Postroom-Ticket") == []
    assert not any(isinstance(e, AddRecipient | RemoveRecipient) for e in out.verdict.edits)
