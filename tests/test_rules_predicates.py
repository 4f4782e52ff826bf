"""Each condition of the rules file on its own: what an admin writes, which mails it catches and which it lets by."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.autoreply import BusinessHours
from postroom.config import HoursConfig
from postroom.mime import readable
from postroom.rules.context import Context
from postroom.rules.facts import MAX_BODY_CHARS, MessageFacts
from postroom.rules.predicates import (
    CONDITIONS,
    AttachmentType,
    BodyContains,
    BodyRegex,
    BusinessHoursCondition,
    HasAttachment,
    Header,
    Mailbox,
    Sender,
    SenderDomain,
    SubjectContains,
    SubjectRegex,
    TimeOfDay,
    Weekday,
)

HOURS = BusinessHours.from_config(HoursConfig(timezone="Europe/Berlin", monday="08:00-17:00"))
CTX = Context(hours=HOURS, mailboxes={"support": "support@example.test", "sales": "sales@example.test"})
MONDAY_NOON = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)

MULTIPART = (
    b"--b1\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"Ich m=F6chte k=FCndigen.\r\n"
    b'--b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename="Rechnung.PDF"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n"
)


def facts(
    *,
    sender: str = "alice@customer.test",
    envelope: str | None = None,
    subject: str = "Hello",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"Just text.\r\n",
    multipart: bool = False,
    mailbox: str = "support",
) -> MessageFacts:
    head = [("From", f"Alice <{sender}>"), ("Subject", subject), *(headers or [])]
    if multipart:
        head += [("MIME-Version", "1.0"), ("Content-Type", 'multipart/mixed; boundary="b1"')]
    return MessageFacts(
        mailbox=mailbox,
        mailbox_address=f"{mailbox}@example.test",
        headers=head,
        envelope_sender=envelope if envelope is not None else f"<{sender}>",
        body=body,
    )


def parse(cls: Any, value: Any) -> Any:
    return cls.parse(value, CTX)


def test_every_condition_has_a_key_and_a_description() -> None:
    keys = [c.key for c in CONDITIONS]
    assert len(keys) == len(set(keys))
    assert all(c.description for c in CONDITIONS)


def test_sender_matches_from_or_envelope_case_insensitively() -> None:
    rule = parse(Sender, ["Boss@BigCorp.example"])
    assert rule.matches(facts(sender="boss@bigcorp.example"), MONDAY_NOON)
    assert rule.matches(facts(sender="x@y.test", envelope="<BOSS@bigcorp.example>"), MONDAY_NOON)
    assert not rule.matches(facts(sender="intern@bigcorp.example"), MONDAY_NOON)
    with pytest.raises(ValueError, match="not an address"):
        parse(Sender, "boss")


def test_sender_domain_covers_subdomains_but_not_lookalikes() -> None:
    rule = parse(SenderDomain, "bigcorp.example")
    assert rule.matches(facts(sender="a@bigcorp.example"), MONDAY_NOON)
    assert rule.matches(facts(sender="a@mail.bigcorp.example"), MONDAY_NOON)
    assert not rule.matches(facts(sender="a@notbigcorp.example"), MONDAY_NOON)
    with pytest.raises(ValueError, match="not a domain"):
        parse(SenderDomain, "a@bigcorp.example")


def test_header_contains_regex_and_presence() -> None:
    spam = facts(headers=[("X-Spam-Flag", "YES")])
    assert parse(Header, {"name": "x-spam-flag", "contains": "yes"}).matches(spam, MONDAY_NOON)
    assert not parse(Header, {"name": "X-Spam-Flag", "contains": "yes"}).matches(facts(), MONDAY_NOON)
    assert parse(Header, {"name": "X-Spam-Flag", "regex": "^y"}).matches(spam, MONDAY_NOON)
    assert parse(Header, {"name": "X-Spam-Flag", "present": False}).matches(facts(), MONDAY_NOON)
    encoded = facts(headers=[("X-Kunde", "=?utf-8?q?M=C3=BCller?=")])
    assert parse(Header, {"name": "X-Kunde", "contains": "müller"}).matches(encoded, MONDAY_NOON)
    with pytest.raises(ValueError, match="exactly one of"):
        parse(Header, {"name": "X-Spam-Flag", "contains": "y", "regex": "y"})
    with pytest.raises(ValueError, match="unknown key 'conatins'"):
        parse(Header, {"name": "X-Spam-Flag", "conatins": "y"})
    with pytest.raises(ValueError, match="must be a table"):
        parse(Header, "X-Spam-Flag")


def test_subject_contains_and_regex_read_the_decoded_subject() -> None:
    mail = facts(subject="=?utf-8?q?Ihre_Rechnung_f=C3=BCr_M=C3=A4rz?=")
    assert parse(SubjectContains, ["invoice", "RECHNUNG"]).matches(mail, MONDAY_NOON)
    assert parse(SubjectRegex, r"f(ü|ue)r\s+m(ä|ae)rz").matches(mail, MONDAY_NOON)
    assert not parse(SubjectContains, "invoice").matches(facts(subject="Hello"), MONDAY_NOON)
    with pytest.raises(ValueError, match="bad regular expression"):
        parse(SubjectRegex, "(unclosed")


def test_body_conditions_read_decoded_text_parts_only() -> None:
    mail = facts(body=MULTIPART, multipart=True)
    assert parse(BodyContains, "KÜNDIGEN").matches(mail, MONDAY_NOON)
    assert parse(BodyRegex, r"m(ö|oe)chte").matches(mail, MONDAY_NOON)
    # The attachment's base64 is not text a rule should see.
    assert not parse(BodyContains, "JVBERi0").matches(mail, MONDAY_NOON)
    html = facts(
        body=b"<html><style>p{}</style><p>Please &amp; thanks: cancel</p></html>",
        headers=[("Content-Type", "text/html")],
    )
    assert parse(BodyContains, "please & thanks").matches(html, MONDAY_NOON)
    assert not parse(BodyContains, "p{}").matches(html, MONDAY_NOON)


def test_attachment_presence_and_type() -> None:
    with_pdf = facts(body=MULTIPART, multipart=True)
    assert parse(HasAttachment, True).matches(with_pdf, MONDAY_NOON)
    assert parse(HasAttachment, False).matches(facts(), MONDAY_NOON)
    assert parse(AttachmentType, "application/*").matches(with_pdf, MONDAY_NOON)
    assert parse(AttachmentType, ".pdf").matches(with_pdf, MONDAY_NOON)  # the filename is Rechnung.PDF
    assert not parse(AttachmentType, ["image/*", ".docx"]).matches(with_pdf, MONDAY_NOON)
    with pytest.raises(ValueError, match="neither a type"):
        parse(AttachmentType, "pdf")
    with pytest.raises(ValueError, match="true or false"):
        parse(HasAttachment, "yes")


def test_broken_mime_has_no_body_and_no_attachments_but_does_not_fail() -> None:
    broken = facts(
        body=b"--b1\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\n\xff\xfe\r\n", multipart=True
    )
    assert not parse(HasAttachment, True).matches(broken, MONDAY_NOON)
    assert not parse(BodyContains, "anything").matches(broken, MONDAY_NOON)


def test_mailbox_by_key_or_address_and_unknown_mailboxes_are_errors() -> None:
    assert parse(Mailbox, "support").matches(facts(mailbox="support"), MONDAY_NOON)
    assert parse(Mailbox, "Sales@Example.test").matches(facts(mailbox="sales"), MONDAY_NOON)
    assert not parse(Mailbox, "sales").matches(facts(mailbox="support"), MONDAY_NOON)
    with pytest.raises(ValueError, match="unknown mailbox 'billing'"):
        parse(Mailbox, "billing")


def test_time_of_day_spans_midnight_in_the_configured_zone() -> None:
    night = parse(TimeOfDay, "18:00-08:00")
    local = HOURS.local
    assert night.matches(facts(), local(datetime(2025, 1, 6, 20, 0, tzinfo=UTC)))  # 21:00 in Berlin
    assert night.matches(facts(), local(datetime(2025, 1, 6, 6, 30, tzinfo=UTC)))  # 07:30 in Berlin
    assert not night.matches(facts(), local(datetime(2025, 1, 6, 7, 0, tzinfo=UTC)))  # 08:00 in Berlin
    with pytest.raises(ValueError, match="the same time"):
        parse(TimeOfDay, "08:00-08:00")
    with pytest.raises(ValueError, match="not a time"):
        parse(TimeOfDay, "8-17")


def test_weekday_in_the_configured_zone() -> None:
    weekend = parse(Weekday, ["sat", "Sunday"])
    # Sunday 23:30 UTC is already Monday in Berlin.
    assert not weekend.matches(facts(), HOURS.local(datetime(2025, 1, 5, 23, 30, tzinfo=UTC)))
    assert weekend.matches(facts(), HOURS.local(datetime(2025, 1, 5, 22, 30, tzinfo=UTC)))
    with pytest.raises(ValueError, match="not a weekday"):
        parse(Weekday, "someday")


def test_business_hours_condition_needs_configured_hours() -> None:
    open_now = parse(BusinessHoursCondition, True)
    assert open_now.matches(facts(), MONDAY_NOON)  # 13:00 on a Monday in Berlin
    assert not open_now.matches(facts(), datetime(2025, 1, 7, 12, 0, tzinfo=UTC))  # Tuesday: closed
    with pytest.raises(ValueError, match="no opening hours"):
        BusinessHoursCondition.parse(True, Context(hours=BusinessHours.from_config(HoursConfig())))


@given(
    st.lists(st.tuples(st.sampled_from(["Content-Type", "Subject", "From", "X-A"]), st.text(max_size=40)), max_size=4),
    st.binary(max_size=400),
)
def test_any_headers_and_body_give_facts_without_raising(headers: list[tuple[str, str]], body: bytes) -> None:
    mail = MessageFacts(mailbox="support", mailbox_address="support@example.test", headers=headers, body=body)
    assert len(mail.body_text) <= MAX_BODY_CHARS
    assert all(a.content_type == a.content_type.lower() and "/" in a.content_type for a in mail.attachments)
    subjects = [readable(v) for k, v in headers if k == "Subject"]
    assert mail.subject == (subjects[0] if subjects else "")
    # No envelope sender here: the senders are the From addresses, each once.
    assert mail.senders == mail.from_addresses == tuple(dict.fromkeys(mail.from_addresses))


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=300))
def test_a_plain_text_body_reads_as_written(text: str) -> None:
    headers = [("Content-Type", "text/plain; charset=utf-8")]
    mail = MessageFacts(mailbox="support", mailbox_address="support@example.test", headers=headers, body=text.encode())
    assert mail.body_text == text[:MAX_BODY_CHARS]
    assert mail.attachments == ()
