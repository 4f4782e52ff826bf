"""The after-queue filter's reading of a mail: header block, Postfix's identity line, and writing the mail back."""

from __future__ import annotations

import email
import email.message
import email.policy

from hypothesis import given
from hypothesis import strategies as st

from postroom.mime import fold
from postroom.smtpd.message import Submitter, parse, render, submitter, without_login_claims
from postroom.smtpd.rewrite import degraded, envelope_after, rewrite
from postroom.verdict import (
    AddHeader,
    AddRecipient,
    ChangeSender,
    Edit,
    RemoveHeader,
    RemoveRecipient,
    ReplaceBody,
    SetHeader,
)

# What Postfix 3.7 writes on top of a mail submitted with SASL and smtpd_sasl_authenticated_header = yes.
POSTFIX_RECEIVED = (
    b"Received: from client.test (localhost [127.0.0.1])\r\n"
    b"\t(Authenticated sender: meier)\r\n"
    b"\tby mx.example.test (Postfix) with ESMTPSA id 4AbC12\r\n"
    b"\tfor <alice@customer.test>; Tue,  3 Jun 2025 10:00:00 +0200 (CEST)\r\n"
)
MAIL = b"From: Meier <meier@example.test>\r\nTo: alice@customer.test\r\nSubject: Hello\r\n\r\nBody line\r\n.dot\r\n"


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)


def test_parse_keeps_folding_raw_bytes_and_the_body_exactly() -> None:
    data = (
        POSTFIX_RECEIVED
        + b"Subject: Gr\xfc\xdfe\r\n"
        + b"References: <a@x>\r\n <b@x>\r\n"
        + b"X-Empty:\r\n"
        + b"X-NoSpace:tight\r\n"
        + b"\r\nbody\r\n\r\nmore\xff\r\n"
    )
    mail = parse(data)
    assert [name for name, _ in mail.headers] == ["Received", "Subject", "References", "X-Empty", "X-NoSpace"]
    assert mail.headers[2][1] == "<a@x>\r\n <b@x>"
    assert mail.body == b"body\r\n\r\nmore\xff\r\n"
    # Untouched headers go out byte for byte: DKIM signatures of the customer's domain stay valid.
    assert render(mail.headers, mail.body, mail.headers) == data.replace(b"X-NoSpace:tight", b"X-NoSpace: tight")


def test_a_line_that_is_no_header_starts_the_body() -> None:
    mail = parse(b"Subject: x\r\nthis is not a header\r\nnor this\r\n")
    assert mail.headers == [("Subject", "x")]
    assert mail.body == b"this is not a header\r\nnor this\r\n"
    assert parse(b"").headers == [] and parse(b"").body == b""
    assert parse(b"Subject: only headers").headers == [("Subject", "only headers")]


def test_login_and_queue_id_come_from_postfixs_own_received_header() -> None:
    mail = parse(POSTFIX_RECEIVED + MAIL)
    assert submitter(mail.headers) == Submitter(login="meier", queue_id="4AbC12", client_addr="127.0.0.1")
    # Several recipients: Postfix ends the "by" line with ";" and puts the date on the next line.
    several = POSTFIX_RECEIVED.replace(b"4AbC12\r\n\tfor <alice@customer.test>;", b"4AbC12;\r\n\t")
    assert submitter(parse(several + MAIL).headers).login == "meier"


def test_mx_mail_has_no_login_but_its_queue_id() -> None:
    received = (
        b"Received: from client.test (localhost [127.0.0.1])\r\n"
        b"\tby mx.example.test (Postfix) with ESMTP id 9XyZ7\r\n"
        b"\tfor <support@example.test>; Tue,  3 Jun 2025 10:00:00 +0200 (CEST)\r\n"
    )
    assert submitter(parse(received + MAIL).headers) == Submitter("", "9XyZ7", "127.0.0.1")


def test_a_customer_cannot_claim_a_login() -> None:
    mx_top = (
        # The HELO name is the client's text: it sits in the first line, which is never trusted.
        b"Received: from (Authenticated sender: meier) (localhost [127.0.0.1])\r\n"
        b"\tby mx.example.test (Postfix) with ESMTP id 9XyZ7\r\n"
        b"\tfor <alice@customer.test>; Tue,  3 Jun 2025 10:00:00 +0200 (CEST)\r\n"
    )
    forged_deeper = (
        b"Received: from evil.test (evil.test [192.0.2.66])\r\n"
        b"\t(Authenticated sender: meier)\r\n"
        b"\tby mail.evil.test (Postfix) with ESMTPSA id 1111\r\n"
        b"\tfor <alice@customer.test>; Tue,  3 Jun 2025 09:00:00 +0200 (CEST)\r\n"
    )
    mail = parse(mx_top + forged_deeper + MAIL)
    assert submitter(mail.headers).login == ""
    # A login line in a header without Postfix's "by" line, or one Postfix broke off a long line (it continues
    # with a space, never a TAB), or in a session that was not authenticated (ESMTP, not ESMTPA) claims nothing.
    no_by = b"Received: from x (x [192.0.2.1])\r\n\t(Authenticated sender: meier)\r\n"
    assert submitter(parse(no_by + MAIL).headers) == Submitter()
    broken = POSTFIX_RECEIVED.replace(b"\t(Authenticated", b" (Authenticated")
    assert submitter(parse(broken + MAIL).headers).login == ""
    unauthenticated = POSTFIX_RECEIVED.replace(b"ESMTPSA", b"ESMTP")
    assert submitter(parse(unauthenticated + MAIL).headers).login == ""


def test_every_login_claim_is_removed_before_the_mail_goes_on() -> None:
    mail = parse(POSTFIX_RECEIVED + b"Received: from a (b [192.0.2.1]) (Authenticated sender: meier) by c\r\n" + MAIL)
    cleaned = without_login_claims(mail.headers)
    assert not any("Authenticated sender" in value for _, value in cleaned)
    assert cleaned[0][1].startswith("from client.test (localhost [127.0.0.1])\r\n\tby mx.example.test (Postfix)")
    assert cleaned[2:] == mail.headers[2:]


def test_rewrite_applies_every_kind_of_edit() -> None:
    mail = parse(POSTFIX_RECEIVED + MAIL)
    edits: list[Edit] = [
        SetHeader("Subject", "[Support #3] Hello"),
        SetHeader("From", '"Meier via Support" <support@example.test>'),
        AddHeader("X-Postroom-Ticket", "3 (Support)"),
        AddHeader("DKIM-Signature", "v=1; d=example.test", top=True),
        RemoveHeader("To"),
        ChangeSender("support@example.test"),
        RemoveRecipient("<support@example.test>"),
        AddRecipient("support+Meier@example.test"),
        ReplaceBody(b"New body\r\n"),
    ]
    out = rewrite(mail, "meier@example.test", ["alice@customer.test", "Support@example.test"], edits)
    assert out.mail_from == "support@example.test"
    assert out.rcpts == ["alice@customer.test", "support+Meier@example.test"]
    msg = parsed(out.data)
    assert list(msg.keys())[:2] == ["DKIM-Signature", "Received"]
    assert msg["Subject"] == "[Support #3] Hello" and msg["To"] is None
    assert msg["X-Postroom-Ticket"] == "3 (Support)"
    assert msg.get_content() == "New body\n"


def test_recipient_edits_never_duplicate_or_drop_every_recipient() -> None:
    # Cc'd the folder address itself: removed and added again, delivered once.
    assert envelope_after("a@x", ["c@y", "s+M@x"], [RemoveRecipient("s+M@x"), AddRecipient("S+M@x")]) == (
        "a@x",
        ["c@y", "S+M@x"],
    )
    mail = parse(MAIL)
    out = rewrite(mail, "a@x", ["s@x"], [RemoveRecipient("s@x")])
    assert out.rcpts == ["s@x"]  # a verdict without recipients would lose the mail: it keeps its own


def test_degraded_delivery_marks_the_mail_and_drops_our_headers_from_outside() -> None:
    mail = parse(b"X-Postroom-Owner: meier\r\n" + MAIL)
    out = degraded(mail, "c@y", ["s@x"])
    msg = parsed(out.data)
    assert msg["X-Postroom-Status"] == "degraded" and msg["X-Postroom-Owner"] is None
    assert out.rcpts == ["s@x"] and msg["Subject"] == "Hello"


def test_values_we_write_cannot_inject_a_header_and_long_ones_are_folded() -> None:
    mail = parse(MAIL)
    out = rewrite(mail, "a@x", ["s@x"], [SetHeader("Subject", "Hi\r\nBcc: victim@y.test " + "word " * 40)])
    msg = parsed(out.data)
    assert msg["Bcc"] is None
    head = out.data.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126) | st.just(" "), max_size=400))
def test_folding_only_adds_line_breaks_before_white_space(value: str) -> None:
    folded = fold("Subject", value)
    assert folded.replace("\r\n", "") == value
    for line in folded.split("\r\n")[1:]:
        assert line[:1] in (" ", "\t")
