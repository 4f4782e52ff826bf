"""Command lines at the top of an agent's body: parsing, and removal from every MIME shape a client sends."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from hypothesis import given
from hypothesis import strategies as st

from postroom import commands


def headers_and_body(msg: EmailMessage) -> tuple[list[tuple[str, str]], bytes]:
    raw = msg.as_bytes(policy=email.policy.SMTP)
    head, _, body = raw.partition(b"\r\n\r\n")
    parsed = email.message_from_bytes(head + b"\r\n\r\n", policy=email.policy.compat32)
    return [(k, str(v)) for k, v in parsed.items()], body


def texts(headers: list[tuple[str, str]], body: bytes) -> dict[str, str]:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers).encode()
    # As a mail client reads it: line ends normalised before decoding.
    msg = email.message_from_bytes((head + b"\r\n" + body).replace(b"\r\n", b"\n"), policy=email.policy.default)
    out: dict[str, str] = {}
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            out[part.get_content_subtype()] = part.get_content()
    return out


def test_parse_lines_stops_at_the_first_text_line() -> None:
    cmds, consumed = commands.parse_lines("#takeover\n\n#priority high\nDear Alice,\n#close\n")
    assert [(c.name, c.args) for c in cmds] == [("takeover", ()), ("priority", ("high",))]
    assert consumed == 3
    assert commands.parse_lines("Dear Alice,\n#close\n")[0] == []


def test_strip_plain() -> None:
    msg = EmailMessage()
    msg.set_content("#takeover\n\nDear Alice,\nbest regards\n")
    h, b = headers_and_body(msg)
    assert [c.name for c in commands.read(h, b)] == ["takeover"]
    new, changed = commands.strip(h, b, [""])
    assert texts([(k, changed.get(k, v)) for k, v in h], new)["plain"] == "Dear Alice,\nbest regards\n"


def test_strip_multipart_alternative_plain_and_html() -> None:
    msg = EmailMessage()
    msg.set_content("#takeover\nDear Alice,\n")
    msg.add_alternative("<html><body><p>#takeover<br>Dear Alice,</p></body></html>", subtype="html")
    h, b = headers_and_body(msg)
    new, _ = commands.strip(h, b, [""])
    parts = texts(h, new)
    assert parts["plain"] == "Dear Alice,\n"
    assert "#takeover" not in parts["html"] and "Dear Alice," in parts["html"]


def test_strip_non_ascii_quoted_printable() -> None:
    msg = EmailMessage()
    msg.set_content("#takeover\nGrüße aus Köln\n", cte="quoted-printable")
    h, b = headers_and_body(msg)
    new, changed = commands.strip(h, b, [""])
    assert texts([(k, changed.get(k, v)) for k, v in h], new)["plain"] == "Grüße aus Köln\n"


def test_html_only_mail_is_read_from_the_html() -> None:
    msg = EmailMessage()
    msg.set_content("<div>#takeover</div><div>Hello</div>", subtype="html")
    h, b = headers_and_body(msg)
    assert [c.name for c in commands.read(h, b)] == ["takeover"]


@given(st.text(max_size=400))
def test_parse_lines_never_raises_and_never_consumes_text(text: str) -> None:
    cmds, consumed = commands.parse_lines(text)
    lines = text.splitlines()
    assert consumed <= len(lines)
    for line in lines[:consumed]:
        assert not line.strip() or line.strip().startswith("#")
    assert len(cmds) <= 20


def test_a_canned_snippet_keeps_the_blank_line_the_agent_wrote_after_it() -> None:
    msg = EmailMessage()
    msg.set_content("#canned refund\n\nBest regards,\nMeier\n")
    headers, body = headers_and_body(msg)
    new_body, changed = commands.strip(headers, body, ["We refunded the invoice."])
    new_headers = [(k, changed.get(k, v)) for k, v in headers]
    assert texts(new_headers, new_body)["plain"] == "We refunded the invoice.\n\nBest regards,\nMeier\n"


def test_removed_command_lines_take_the_blank_lines_after_them() -> None:
    msg = EmailMessage()
    msg.set_content("#close\n\nThanks, done.\n")
    headers, body = headers_and_body(msg)
    new_body, changed = commands.strip(headers, body, [""])
    assert texts([(k, changed.get(k, v)) for k, v in headers], new_body)["plain"] == "Thanks, done.\n"
