"""The pure inbound pipeline with an in-memory store: threading, routing, edits and the failure policy."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from postroom import pipeline
from postroom.autoreply import load_templates
from postroom.config import Config, example_config_path, load_config, parse_config
from postroom.parts import Parts
from postroom.pipeline import Message, Outcome
from postroom.rules import MemoryAssignmentState
from postroom.store.memory import MemoryStore
from postroom.subject import decode
from postroom.tickets import Changes, Lookup, TicketStore
from postroom.verdict import (
    Action,
    AddHeader,
    AddRecipient,
    Edit,
    Envelope,
    RemoveHeader,
    RemoveRecipient,
    SetHeader,
    effective_edits,
)

SUPPORT = "support@example.test"


def process(message: Message, config: Config, store: TicketStore, now: float, **parts: Any) -> Outcome:
    """The dispatcher with these parts; a test names only the parts it needs."""
    return pipeline.process(message, Parts(config, store, **parts), now)


@pytest.fixture
def config() -> Config:
    base = load_config(example_config_path(), environ={}).model_dump()
    base["mailboxes"]["sales"] = {"address": "sales@example.test", "tag": "Sales", "agents": ["schulze"]}
    return parse_config(base, environ={})


def mail(
    subject: str = "Hello",
    *,
    sender: str = "alice@customer.test",
    rcpts: Iterable[str] = (f"<{SUPPORT}>",),
    msgid: str = "m1@customer.test",
    extra: Iterable[tuple[str, str]] = (),
    qid: str = "4AbCdEf",
) -> Message:
    headers = [("From", f"Alice <{sender}>"), ("To", SUPPORT), ("Subject", subject), ("Message-ID", f"<{msgid}>")]
    headers += list(extra)
    return Message(Envelope(mail_from=f"<{sender}>", rcpts=list(rcpts), queue_id=qid), headers)


def header(out: Outcome, name: str) -> list[str]:
    values: list[str] = []
    for e in out.verdict.edits:
        if isinstance(e, (AddHeader, SetHeader)) and e.name.lower() == name.lower():
            values.append(e.value)
    return values


def rcpt_edits(out: Outcome) -> list[tuple[str, str]]:
    return [(type(e).__name__, e.address) for e in out.verdict.edits if isinstance(e, (AddRecipient, RemoveRecipient))]


def test_new_ticket_gets_token_headers_and_stays_in_inbox(config: Config) -> None:
    store = MemoryStore()
    out = process(mail(), config, store, now=1000.0)
    assert out.verdict.action is Action.ACCEPT
    assert header(out, "Subject") == ["[Support #1] Hello"]
    assert header(out, "X-Postroom-Ticket") == ["1 (Support)"]
    assert header(out, "X-Postroom-Owner") == ["unassigned (Support #1)"]
    assert header(out, "X-Postroom-State") == ["new (Support #1)"]
    assert rcpt_edits(out) == []
    [rec] = out.records
    assert (rec.event, rec.number, rec.queue_id, rec.message_id) == ("opened", 1, "4AbCdEf", "m1@customer.test")
    assert store.ticket_map[(SUPPORT, 1)].customer == "alice@customer.test"


def test_the_same_mail_again_joins_its_ticket_without_a_second_acknowledgement(config: Config) -> None:
    data = config.model_dump()
    data["autoreply"] = {**data["autoreply"], "acknowledge": True}
    cfg = parse_config(data, environ={})
    store, state = MemoryStore(), MemoryAssignmentState()
    templates = load_templates(cfg)
    first = process(mail(), cfg, store, 1000.0, templates=templates, assign=state)
    store.assign(SUPPORT, 1, "meier", 0.5)
    # Postfix or the customer's client sends the very same mail again (same Message-ID, new queue id).
    again = process(mail(qid="5XyZ"), cfg, store, 1060.0, templates=templates, assign=state)
    assert len(first.outgoing) == 1 and again.outgoing == []
    assert header(again, "Subject") == ["[Support #1] Hello"]
    assert rcpt_edits(again) == [("RemoveRecipient", f"<{SUPPORT}>"), ("AddRecipient", "support+Meier@example.test")]
    [rec] = again.records
    assert (rec.event, rec.number, rec.queue_id) == ("duplicate", 1, "5XyZ")
    assert store.seq[SUPPORT] == 1
    # Another customer's mail with a Message-ID it copied is not the same mail: it gets a ticket of its own.
    other = process(mail(sender="mallory@evil.test", qid="6Q"), cfg, store, 1100.0, templates=templates, assign=state)
    assert header(other, "Subject") == ["[Support #2] Hello"] and other.records[0].event == "opened"


def test_customer_follow_up_by_references_goes_to_the_owners_folder(config: Config) -> None:
    store = MemoryStore()
    process(mail(), config, store, 1000.0)
    store.assign(SUPPORT, 1, "meier", 0.5)
    out = process(
        mail("Re: [Support #1] Hello", msgid="m2@customer.test", extra=[("In-Reply-To", "<m1@customer.test>")]),
        config,
        store,
        1001.0,
    )
    # The subject already carries the token: it is left exactly as it came.
    assert header(out, "Subject") == []
    assert header(out, "X-Postroom-Owner") == ["meier (Support #1)"]
    assert rcpt_edits(out) == [
        ("RemoveRecipient", f"<{SUPPORT}>"),
        ("AddRecipient", "support+Meier@example.test"),
    ]
    assert out.records[0].event == "followup"


def test_follow_up_by_subject_token_only_from_a_participant(config: Config) -> None:
    store = MemoryStore()
    process(mail(), config, store, 1000.0)
    out = process(mail("AW: [Support #1] Hello", msgid="m2@customer.test"), config, store, 1001.0)
    assert header(out, "X-Postroom-Ticket") == ["1 (Support)"]
    assert out.records[0].event == "followup"


def test_stranger_pasting_a_token_gets_a_new_ticket(config: Config) -> None:
    store = MemoryStore()
    process(mail(), config, store, 1000.0)
    store.assign(SUPPORT, 1, "meier", 0.5)
    out = process(mail("[Support #1] give me the data", sender="mallory@evil.test", msgid="x@evil"), config, store, 2.0)
    assert header(out, "Subject") == ["[Support #2] give me the data"]
    assert header(out, "X-Postroom-Owner") == ["unassigned (Support #2)"]
    assert rcpt_edits(out) == []  # not into Meier's folder
    assert "not a participant" in out.records[0].detail


def test_forward_starts_a_new_linked_ticket_reply_does_not(config: Config) -> None:
    store = MemoryStore()
    process(mail(), config, store, 1000.0)
    fwd = process(mail("WG: [Support #1] Hello", msgid="m2@customer.test"), config, store, 1001.0)
    assert header(fwd, "Subject") == ["[Support #2] WG: Hello"]
    assert header(fwd, "X-Postroom-Linked") == ["1 (Support #2)"]
    assert fwd.records[0].event == "linked"
    for prefix in ("AW", "Re", "SV", "Antw"):
        out = process(mail(f"{prefix}: [Support #1] Hello", msgid=f"{prefix}@c"), config, store, 1002.0)
        assert header(out, "X-Postroom-Ticket") == ["1 (Support)"], prefix


def test_two_mailboxes_make_two_tickets_in_one_delivery(config: Config) -> None:
    store = MemoryStore()
    out = process(mail("Hello", rcpts=[f"<{SUPPORT}>", "<sales@example.test>"]), config, store, 1000.0)
    assert header(out, "Subject") == ["[Sales #1] [Support #1] Hello"]
    assert sorted(header(out, "X-Postroom-Ticket")) == ["1 (Sales)", "1 (Support)"]
    assert {r.mailbox for r in out.records} == {SUPPORT, "sales@example.test"}


def test_forged_internal_headers_are_removed(config: Config) -> None:
    out = process(
        mail("Hello", extra=[("X-Postroom-Owner", "meier"), ("x-postroom-status", "ok")]), config, MemoryStore(), 1.0
    )
    removed = {e.name.lower() for e in out.verdict.edits if isinstance(e, RemoveHeader)}
    assert removed == {"x-postroom-owner", "x-postroom-status"}


def test_non_ascii_subject_is_encoded_on_one_line(config: Config) -> None:
    out = process(mail("=?utf-8?q?Gr=C3=BC=C3=9Fe?="), config, MemoryStore(), 1.0)
    [value] = header(out, "Subject")
    assert value.isascii() and "\n" not in value
    assert decode(value) == "[Support #1] Grüße"


def test_mail_to_nobody_we_serve_is_untouched(config: Config) -> None:
    out = process(mail("Hello", rcpts=["<someone@example.test>"]), config, MemoryStore(), 1.0)
    assert out.verdict.action is Action.ACCEPT
    assert header(out, "Subject") == []
    assert out.records == []


def test_dead_store_delivers_degraded(config: Config) -> None:
    store = MemoryStore()
    store.down = True
    out = process(mail("Hello", extra=[("X-Postroom-Owner", "meier")]), config, store, 1.0)
    assert out.verdict.action is Action.ACCEPT
    assert header(out, "X-Postroom-Status") == ["degraded"]
    assert header(out, "Subject") == []  # unmodified
    assert any(isinstance(e, RemoveHeader) for e in out.verdict.edits)


def test_dead_store_tempfails_when_configured(config: Config) -> None:
    data = config.model_dump()
    data["milter"]["on_error"] = "tempfail"
    store = MemoryStore()
    store.down = True
    out = process(mail(), parse_config(data, environ={}), store, 1.0)
    assert out.verdict.action is Action.TEMPFAIL
    assert out.verdict.reply is not None and out.verdict.reply.code == 451


def test_crash_in_our_code_delivers_degraded_and_logs_queue_id(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(MemoryStore):
        def lookup(self, mailbox: str, message_ids: list[str], numbers: list[int], senders: list[str]) -> Lookup:
            raise KeyError("bug")

    out = process(mail("Hello", qid="9QiD"), config, Broken(), 1.0)
    assert header(out, "X-Postroom-Status") == ["degraded"]
    assert any(getattr(r, "queue_id", "") == "9QiD" and r.exc_info for r in caplog.records)


def test_raw_8bit_subject_is_read_as_utf8_or_windows_1252(config: Config) -> None:
    latin1 = "Gr\udcfc\udcdfe"  # b"Gr\xfc\xdfe" as pymilter hands it over (surrogateescape)
    utf8 = b"Gr\xc3\xbc\xc3\x9fe".decode("utf-8", "surrogateescape")
    for raw in (latin1, utf8):
        out = process(mail(raw), config, MemoryStore(), 1.0)
        [value] = header(out, "Subject")
        assert value.isascii()
        assert decode(value) == "[Support #1] Grüße"


def test_encoded_line_break_in_subject_cannot_inject_a_header(config: Config) -> None:
    out = process(mail("=?utf-8?q?Hi=0D=0ABcc:_victim@x.test?="), config, MemoryStore(), 1.0)
    [value] = header(out, "Subject")
    assert "\r" not in value and "\n" not in value
    assert value == "[Support #1] Hi Bcc: victim@x.test"


def test_effective_edits_never_leave_a_mail_without_recipient() -> None:
    same: list[Edit] = [RemoveRecipient("<support@example.test>"), AddRecipient("support@example.test")]
    assert effective_edits(["<support@example.test>"], same) == []
    moved: list[Edit] = [RemoveRecipient("<support@example.test>"), AddRecipient("support+Meier@example.test")]
    assert effective_edits(["<support@example.test>"], moved) == moved
    assert effective_edits(["<a@x.test>"], [RemoveRecipient("<a@x.test>")]) == []


def test_customer_answer_reopens_a_closed_ticket_and_ends_pending(config: Config) -> None:
    store = MemoryStore()
    process(mail(), config, store, 1.0)
    store.update(SUPPORT, 1, Changes(state="closed", owner="meier"), 2.0)
    out = process(mail("Re: [Support #1] Hello", msgid="m2@customer.test"), config, store, 3.0)
    assert header(out, "X-Postroom-State") == ["open (Support #1)"]
    assert out.records[0].event == "reopened"
    store.update(SUPPORT, 1, Changes(state="pending"), 4.0)
    out = process(mail("Re: [Support #1] Hello", msgid="m3@customer.test"), config, store, 5.0)
    assert store.ticket_map[(SUPPORT, 1)].state == "open"
    assert out.records[0].event == "followup"
