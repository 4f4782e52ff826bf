"""Command lines at the top of an agent's mail body (``#takeover``, ...), and removing them before sending.

Only the outbound path calls this, and only for an authenticated agent: a customer's ``#close`` is text.
The body is MIME: the commands are read from the first text/plain part (or text/html when there is none) and
removed from every text part that starts with them, so the customer sees neither the plain nor the HTML
version of them.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

COMMAND_RE = re.compile(r"^#([a-z][a-z-]{1,20})(?:[ \t]+(.*))?$", re.IGNORECASE)
_HTML_BREAK = re.compile(r"<br\s*/?>|</p\s*>|</div\s*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^>]*>")
_MAX_COMMANDS = 20


@dataclass(frozen=True)
class Command:
    name: str  # lower case, without "#"
    args: tuple[str, ...]
    line: str  # as the agent wrote it, for error replies


def parse_lines(text: str) -> tuple[list[Command], int]:
    """Leading command lines of ``text`` (blank lines between them allowed) and how many lines they span."""
    commands: list[Command] = []
    consumed = 0
    lines = text.splitlines()
    for i, raw in enumerate(lines[: _MAX_COMMANDS * 2]):
        line = raw.strip()
        if not line:
            continue
        m = COMMAND_RE.match(line)
        if not m:
            break
        commands.append(Command(m.group(1).lower(), tuple((m.group(2) or "").split()), line))
        consumed = i + 1
        if len(commands) >= _MAX_COMMANDS:
            break
    return commands, consumed


def _text_parts(msg: Message) -> list[Message]:
    return [p for p in msg.walk() if not p.is_multipart() and p.get_content_maintype() == "text"]


def _decoded(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        text = payload.decode(charset, "replace")
    except LookupError:
        text = payload.decode("utf-8", "replace")
    # The generator writes every line end as CRLF again; inside Python a line ends in "\n".
    return text.replace("\r\n", "\n")


def _html_text(html: str) -> str:
    return _HTML_TAG.sub("", _HTML_BREAK.sub("\n", html)).replace("&nbsp;", " ")


def read(headers: list[tuple[str, str]], body: bytes) -> list[Command]:
    msg = _parse(headers, body)
    parts = _text_parts(msg)
    plain = [p for p in parts if p.get_content_subtype() == "plain"]
    if plain:
        return parse_lines(_decoded(plain[0]))[0]
    html = [p for p in parts if p.get_content_subtype() == "html"]
    if html:
        return parse_lines(_html_text(_decoded(html[0])))[0]
    return []


def _parse(headers: list[tuple[str, str]], body: bytes) -> Message:
    mime = [(k, v) for k, v in headers if k.lower().startswith("content-") or k.lower() == "mime-version"]
    head = "".join(f"{k}: {v}\r\n" for k, v in mime).encode("utf-8", "surrogateescape")
    return email.message_from_bytes(head + b"\r\n" + body, policy=email.policy.compat32)


def _strip_plain(text: str, count: int) -> str:
    commands, consumed = parse_lines(text)
    if len(commands) < count:
        return text
    lines = text.splitlines(keepends=True)
    rest = lines[consumed:]
    while rest and not rest[0].strip():
        rest = rest[1:]
    return "".join(rest)


def _strip_html(html: str, count: int) -> str:
    # Remove the first ``count`` command lines wherever they stand in the markup, keeping all other markup.
    out = html
    for _ in range(count):
        m = re.search(r"#[a-z][a-z-]{1,20}(?:[ \t]+[^<\r\n]*)?", out, re.IGNORECASE)
        if not m:
            break
        end = m.end()
        br = re.match(r"\s*<br\s*/?>", out[end:], re.IGNORECASE)
        if br:
            end += br.end()
        out = out[: m.start()] + out[end:]
    return out


def strip(headers: list[tuple[str, str]], body: bytes, count: int) -> tuple[bytes, dict[str, str]]:
    """Remove the first ``count`` command lines from every text part; returns the new body and the top-level
    MIME headers whose value changed (a single-part mail may change its Content-Transfer-Encoding)."""
    msg = _parse(headers, body)
    for part in _text_parts(msg):
        text = _decoded(part)
        new = _strip_html(text, count) if part.get_content_subtype() == "html" else _strip_plain(text, count)
        if new == text:
            continue
        charset = part.get_content_charset() or "utf-8"
        cte = (part.get("Content-Transfer-Encoding") or "").lower()
        del part["Content-Transfer-Encoding"]
        try:
            new.encode("ascii")
            ascii_only = True
        except UnicodeEncodeError:
            ascii_only = False
        if ascii_only and cte in ("", "7bit", "8bit"):
            part.set_payload(new, "us-ascii" if charset.lower() in ("us-ascii", "ascii") else None)
            part["Content-Transfer-Encoding"] = cte or "7bit"
        else:
            part.set_payload(new, "utf-8")  # base64 or QP by the utf-8 charset's rules
            part.set_param("charset", "utf-8")
    flat = msg.as_bytes(policy=email.policy.compat32.clone(linesep="\r\n"))
    head, _, new_body = flat.partition(b"\r\n\r\n")
    changed: dict[str, str] = {}
    before = {k.lower(): v for k, v in headers}
    for line in re.split(rb"\r\n(?![ \t])", head):
        name, _, value = line.decode("utf-8", "surrogateescape").partition(":")
        value = " ".join(value.split())
        if name.lower().startswith("content-") and " ".join(before.get(name.lower(), "").split()) != value:
            changed[name] = value
    return new_body, changed
