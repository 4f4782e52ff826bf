"""Automatic replies: RFC 3834 refusals, language, opening hours, templates, the message itself and the plan."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from postroom.autoreply import (
    BusinessHours,
    TemplateError,
    Templates,
    build_auto_reply,
    choose_language,
    format_opening,
    load_templates,
    plan_auto_reply,
    should_auto_reply,
)
from postroom.config import Config, HoursConfig, example_config_path, load_config, parse_config
from postroom.dkim import Keyring, public_txt
from postroom.rules import MemoryAssignmentState
from tests.dkim_check import assert_verified

EXAMPLE = load_config(example_config_path(), environ={})
TEMPLATES = load_templates(EXAMPLE)
KEYS = Keyring.from_config(EXAMPLE)
# Monday 6 January 2025, 10:00 in Berlin: open.  Friday 10 January, 19:00 in Berlin: closed until Monday 08:00.
OPEN = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
FRIDAY_EVENING = datetime(2025, 1, 10, 18, 0, tzinfo=UTC)
PERSON = [
    ("From", "Alice <alice@customer.test>"),
    ("To", "support@example.test"),
    ("Subject", "Printer on fire"),
    ("Message-ID", "<m1@customer.test>"),
    ("References", "<m0@customer.test>"),
]


def config(**autoreply: object) -> Config:
    data = EXAMPLE.model_dump()
    data["autoreply"] = {**data["autoreply"], "acknowledge": True, **autoreply}
    return parse_config(data, environ={})


ACK_ON = config()


# -- RFC 3834: whom we never answer --


@pytest.mark.parametrize(
    ("extra", "sender", "reason"),
    [
        ([("Auto-Submitted", "auto-replied")], "alice@customer.test", "Auto-Submitted: auto-replied"),
        ([("Auto-Submitted", "auto-generated; owner-email=x@y")], "alice@customer.test", "Auto-Submitted"),
        ([("Precedence", "bulk")], "alice@customer.test", "Precedence: bulk"),
        ([("Precedence", "List")], "alice@customer.test", "Precedence: list"),
        ([("Precedence", "junk")], "alice@customer.test", "Precedence: junk"),
        ([("List-Id", "<news.customer.test>")], "alice@customer.test", "list mail"),
        ([("X-Auto-Response-Suppress", "OOF, AutoReply")], "alice@customer.test", "X-Auto-Response-Suppress"),
        ([("Content-Type", "multipart/report; report-type=delivery-status")], "alice@customer.test", "report"),
        ([], "", "empty return path"),
        ([], "<>", "empty return path"),
        ([], "MAILER-DAEMON@mx.customer.test", "is a program"),
        ([], "postmaster@customer.test", "is a program"),
        ([], "no-reply@shop.test", "is a program"),
        ([], "noreply@shop.test", "is a program"),
        ([], "donotreply@shop.test", "is a program"),
        ([], "owner-list@lists.test", "is a program"),
        ([], "list-request@lists.test", "is a program"),
        ([], "support@example.test", "our own address"),
        ([], "support+Meier@example.test", "our own address"),
        ([], "meier@example.test", "our own address"),
        ([("X-Postroom-Ticket", "17 (Sales)")], "alice@customer.test", "our own mail"),
    ],
)
def test_never_answers_programs_lists_bounces_or_ourselves(
    extra: list[tuple[str, str]], sender: str, reason: str
) -> None:
    check = should_auto_reply([*PERSON, *extra], sender, EXAMPLE)
    assert not check
    assert reason in check.reason


def test_a_robot_in_from_is_refused_even_with_a_person_as_envelope_sender() -> None:
    headers = [("From", "Shop <noreply@shop.test>"), ("Subject", "Your order")]
    assert not should_auto_reply(headers, "bounce-123@shop.test", EXAMPLE)


def test_answers_people_and_auto_submitted_no() -> None:
    assert should_auto_reply(PERSON, "alice@customer.test", EXAMPLE)
    assert should_auto_reply([*PERSON, ("Auto-Submitted", "no")], "<alice@customer.test>", EXAMPLE)
    assert should_auto_reply([*PERSON, ("Precedence", "first-class")], "alice@customer.test", EXAMPLE)


# -- language --


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("Content-Language", "de-DE")], "de"),
        ([("Content-Language", "fr, nl")], "nl"),
        ([("Accept-Language", "fr-CH, fr;q=0.9, de;q=0.7, nl;q=0.8")], "nl"),
        ([("Accept-Language", "de;q=0.1, en;q=0.5")], "en"),
        ([("Content-Language", "nl-BE"), ("Accept-Language", "de")], "nl"),
        ([("Content-Language", "fr")], "en"),  # the configured default
        ([], "en"),
    ],
)
def test_language_from_content_language_or_accept_language(headers: list[tuple[str, str]], expected: str) -> None:
    assert choose_language(headers, {"de", "en", "nl"}, "en") == expected


def test_default_language_when_the_customer_asks_for_none_we_have() -> None:
    assert choose_language([("Content-Language", "fr")], {"de", "nl"}, "nl") == "nl"
    assert choose_language([], {"de"}, "nl") == "de"


# -- opening hours --

HOURS = BusinessHours.from_config(EXAMPLE.hours)


def test_opening_hours_in_the_configured_zone() -> None:
    assert HOURS.is_open(OPEN)
    assert not HOURS.is_open(FRIDAY_EVENING)
    assert not HOURS.is_open(datetime(2025, 1, 10, 11, 30, tzinfo=UTC))  # Friday 12:30: the lunch break
    assert not HOURS.is_open(datetime(2025, 12, 25, 10, 0, tzinfo=UTC))  # a Thursday, but a holiday


def test_next_opening_skips_weekends_and_holidays() -> None:
    nxt = HOURS.next_opening(FRIDAY_EVENING)
    assert nxt is not None and nxt.isoformat() == "2025-01-13T08:00:00+01:00"
    christmas_eve = datetime(2025, 12, 23, 17, 0, tzinfo=UTC)  # Tuesday 18:00; 24th to 26th are holidays
    nxt = HOURS.next_opening(christmas_eve)
    assert nxt is not None and nxt.isoformat() == "2025-12-29T08:00:00+01:00"
    lunch = HOURS.next_opening(datetime(2025, 1, 10, 11, 30, tzinfo=UTC))
    assert lunch is not None and lunch.isoformat() == "2025-01-10T13:00:00+01:00"
    assert BusinessHours.from_config(HoursConfig()).next_opening(OPEN) is None


def test_next_opening_reads_naturally_in_each_language() -> None:
    nxt = HOURS.next_opening(FRIDAY_EVENING)
    assert format_opening(nxt, "en") == "Monday, 13 January at 08:00 (Europe/Berlin)"
    assert format_opening(nxt, "de") == "Montag, 13. Januar um 08:00 Uhr (Europe/Berlin)"
    assert format_opening(nxt, "nl") == "maandag 13 januari om 08:00 (Europe/Berlin)"
    assert format_opening(nxt, "fr") == "Monday, 13 January at 08:00 (Europe/Berlin)"


def test_bad_opening_hours_are_config_errors() -> None:
    with pytest.raises(ValueError, match=r"hours\.monday"):
        parse_config({"hours": {"monday": "8-17"}}, environ={})
    with pytest.raises(ValueError, match="unknown time zone"):
        parse_config({"hours": {"timezone": "Mars/Olympus"}}, environ={})
    with pytest.raises(ValueError, match="not a date"):
        parse_config({"hours": {"holidays": ["25.12.2025"]}}, environ={})


# -- templates --


def test_shipped_templates_cover_ack_closed_and_urgent_in_three_languages() -> None:
    for name in ("ack", "closed", "urgent"):
        assert TEMPLATES.languages("support", name) == ["de", "en", "nl"]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_template_mistakes_name_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "ack.en.txt", "Subject: Hi\n\nTicket $ticket, $tikcet\n")
    write(tmp_path / "closed.en.txt", "Hello\n\nno subject line\n")
    write(tmp_path / "ack-english.txt", "Subject: x\n\ny\n")
    write(tmp_path / "urgent.en.txt", "Subject: x\n\nCosts $ 5\n")
    write(tmp_path / "billing" / "ack.en.txt", "Subject: x\n\ny\n")
    with pytest.raises(TemplateError) as err:
        load_templates(config(templates_dir=str(tmp_path)))
    text = str(err.value)
    assert f"{tmp_path / 'ack.en.txt'}:3: unknown placeholder $tikcet" in text
    assert f"{tmp_path / 'closed.en.txt'}:1: the first line must be 'Subject: ...'" in text
    assert f"{tmp_path / 'ack-english.txt'}:1: a template file is named <name>.<language>.txt" in text
    assert f"{tmp_path / 'urgent.en.txt'}:3: a '$' that is no placeholder" in text
    assert f"{tmp_path / 'billing'}:1: no mailbox 'billing' in the config" in text


def test_acknowledging_needs_the_templates(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="templates_dir is not a directory"):
        load_templates(config(templates_dir=str(tmp_path / "missing")))
    write(tmp_path / "ack.en.txt", "Subject: x\n\ny\n")
    with pytest.raises(TemplateError, match=r"closed\.en\.txt:1: missing"):
        load_templates(config(templates_dir=str(tmp_path)))  # the example config has opening hours
    assert len(load_templates(config(templates_dir=str(tmp_path / "missing"), acknowledge=False))) == 0


def test_a_mailbox_directory_overrides_a_template_for_that_mailbox(tmp_path: Path) -> None:
    write(tmp_path / "ack.en.txt", "Subject: Thanks\n\nGeneric text\n")
    write(tmp_path / "closed.en.txt", "Subject: Closed\n\nBack on $next_opening\n")
    write(tmp_path / "support" / "ack.en.txt", "Subject: Support thanks\n\nSupport text\n")
    templates = load_templates(config(templates_dir=str(tmp_path)))
    support = templates.get("support", "ack", "en")
    assert support is not None and support.body.template == "Support text\n"
    other = templates.get("sales", "ack", "en")
    assert other is not None and other.body.template == "Generic text\n"


# -- the reply message --


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def build(headers: list[tuple[str, str]], template: str = "ack", now: datetime = OPEN) -> bytes:
    return build_auto_reply(
        ACK_ON,
        TEMPLATES,
        KEYS,
        mailbox="support",
        ticket=17,
        template=template,
        original=headers,
        to="alice@customer.test",
        now=now,
        message_id_value="<ack17@example.test>",
    )


def test_the_reply_threads_is_marked_automatic_and_names_the_ticket() -> None:
    msg = parse(build(PERSON))
    assert msg["From"] == "Support <support@example.test>"
    assert msg["To"] == "alice@customer.test"
    assert msg["Subject"] == "Re: [Support #17] Printer on fire"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<m1@customer.test>"
    assert msg["References"] == "<m0@customer.test> <m1@customer.test>"
    assert msg["Message-ID"] == "<ack17@example.test>"
    body = msg.get_content()
    assert "filed it as ticket [Support #17]" in body
    assert "This is an automatic reply to your mail to support@example.test." in body


def test_the_reply_speaks_the_customers_language_and_names_the_next_opening() -> None:
    german = [*PERSON, ("Content-Language", "de-AT")]
    msg = parse(build(german, "closed", FRIDAY_EVENING))
    assert msg["Content-Language"] == "de"
    body = msg.get_content()
    assert "Wir sind wieder da am\nMontag, 13. Januar um 08:00 Uhr (Europe/Berlin)" in body
    assert "unter der Nummer [Support #17]" in body


def test_a_known_token_in_the_customers_subject_is_not_doubled() -> None:
    msg = parse(build([("Subject", "AW: [Support #17] Printer on fire"), ("From", "alice@customer.test")]))
    assert msg["Subject"] == "Re: [Support #17] Printer on fire"


def test_the_reply_is_dkim_signed_for_the_shared_domain() -> None:
    data = build(PERSON)
    key = KEYS.for_address("support@example.test")
    assert key is not None
    record = {f"{key.selector}._domainkey.example.test.": public_txt(key.private_pem)}
    assert_verified(data, record)
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    unsigned = build_auto_reply(
        ACK_ON,
        TEMPLATES,
        Keyring({}),
        mailbox="support",
        ticket=17,
        template="ack",
        original=PERSON,
        to="alice@customer.test",
        now=OPEN,
        message_id_value="<x@example.test>",
    )
    assert b"DKIM-Signature" not in unsigned


# -- the plan: template choice, refusals and the cap together --


def plan(
    *,
    cfg: Config = ACK_ON,
    headers: list[tuple[str, str]] = PERSON,
    sender: str = "alice@customer.test",
    new_ticket: bool = True,
    rule_template: str = "",
    now: datetime = OPEN,
    cap: MemoryAssignmentState | None = None,
    templates: Templates = TEMPLATES,
) -> tuple[str, str]:
    result = plan_auto_reply(
        cfg,
        templates,
        KEYS,
        cap or MemoryAssignmentState(),
        mailbox="support",
        ticket=17,
        new_ticket=new_ticket,
        rule_template=rule_template,
        headers=headers,
        envelope_sender=sender,
        queue_id="4AbC12",
        now=now,
    )
    if result.mail is None:
        return "", result.reason
    assert result.mail.mail_from == ""  # the null sender: a failed auto-reply bounces nowhere
    assert result.mail.rcpts == (sender.strip("<>").lower(),)
    assert result.mail.cause_queue_id == "4AbC12"
    assert f"<{result.message_id}>" == parse(result.mail.data)["Message-ID"]
    return str(parse(result.mail.data)["Subject"]), result.reason


def test_a_new_ticket_is_acknowledged_and_a_follow_up_is_not() -> None:
    subject, reason = plan()
    assert subject == "Re: [Support #17] Printer on fire"
    assert reason == "auto-reply 'ack' for Support #17 to alice@customer.test"
    assert plan(new_ticket=False) == ("", "no auto-reply for this mail")


def test_outside_opening_hours_the_acknowledgement_is_the_business_hours_reply() -> None:
    _subject, reason = plan(now=FRIDAY_EVENING)
    assert "auto-reply 'closed'" in reason


def test_rules_pick_another_template_or_none() -> None:
    assert "auto-reply 'urgent'" in plan(rule_template="urgent")[1]
    assert plan(rule_template="none")[0] == ""
    quiet = config(acknowledge=False)
    assert plan(cfg=quiet)[0] == ""  # nothing acknowledges by default
    assert "auto-reply 'urgent'" in plan(cfg=quiet, rule_template="urgent")[1]


def test_refusals_and_the_cap_come_with_a_reason() -> None:
    assert plan(headers=[*PERSON, ("Precedence", "bulk")]) == ("", "not answered: Precedence: bulk")
    cap = MemoryAssignmentState()
    answered = [plan(cap=cap)[0] != "" for _ in range(6)]
    assert answered == [True] * 5 + [False]
    assert plan(cap=cap)[1] == "not answered: alice@customer.test reached the cap of 5 a day"


def test_two_postroom_mailboxes_answering_each_other_stop_at_once() -> None:
    """support@example.test acknowledges a mail from help@other.test, whose own postroom sees our reply: it must
    not answer it, or the two would acknowledge each other for ever."""
    other = parse_config(
        {
            "mailboxes": {"help": {"address": "help@other.test", "tag": "Help"}},
            "autoreply": {"acknowledge": True, "templates_dir": str(example_config_path().parent / "templates")},
        },
        environ={},
    )
    first = plan_auto_reply(
        ACK_ON,
        TEMPLATES,
        KEYS,
        MemoryAssignmentState(),
        mailbox="support",
        ticket=1,
        new_ticket=True,
        rule_template="",
        headers=[("From", "help@other.test"), ("Subject", "Hello"), ("Message-ID", "<h1@other.test>")],
        envelope_sender="help@other.test",
        queue_id="Q1",
        now=OPEN,
    )
    assert first.mail is not None
    reply = parse(first.mail.data)
    headers = [(k, str(v)) for k, v in reply.items()]
    second = plan_auto_reply(
        other,
        load_templates(other),
        Keyring({}),
        MemoryAssignmentState(),
        mailbox="help",
        ticket=1,
        new_ticket=True,
        rule_template="",
        headers=headers,
        envelope_sender="",  # what our reply's envelope says
        queue_id="Q2",
        now=OPEN,
    )
    assert second.mail is None
    assert second.reason == "not answered: empty return path (a bounce or another automatic mail)"
    # And even through a relay that rewrote the envelope sender, Auto-Submitted stops it.
    assert not should_auto_reply(headers, "srs0=abc@relay.test", other)
