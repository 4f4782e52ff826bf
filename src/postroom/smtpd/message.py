"""The mail as Postfix hands it to the after-queue filter: its header block, its body, and who submitted it.

A milter gets the SMTP login (``{auth_authen}``) and the queue id (``{i}``) from Postfix as macros.  A content
filter gets neither over SMTP, so it reads them from the Received header Postfix itself put on top of the mail
(``smtpd_sasl_authenticated_header = yes`` on the submission listener adds the login):

    Received: from client.example (client.example [192.0.2.7])
    <TAB>(Authenticated sender: meier)
    <TAB>by mx.example.test (Postfix) with ESMTPSA id 4AbC12
    <TAB>for <alice@customer.test>; Tue, 3 Jun 2025 10:00:00 +0200

Only the topmost Received header is Postfix's own: Postfix writes it above everything the client sent, so a
customer can put any text into deeper Received headers but none above it.  Inside it, only the first line holds
text the client chose (the HELO name); every further line is one Postfix wrote, starting with a TAB.  So the login
is read from a TAB line of the top header that comes before its "by" line and nowhere else; the HELO name
"(Authenticated sender: meier)" or a forged deeper header claims nothing.  Every such claim is removed from the
mail before it goes on: the customer must not learn an agent's login, and nothing downstream should trust one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postroom.mime import fold

# RFC 5322 field names: printable ASCII except the colon.
_FIELD = re.compile(rb"^([!-9;-~]+):")
_AUTH_LINE = re.compile(r"^\t\(Authenticated sender: (.+)\)$")
# Postfix: "\tby $myhostname ($mail_name) with $protocol id $queue_id" (";" when the date follows on this line).
_BY_LINE = re.compile(r"^\tby \S+ \(.*\) with (\S+) id ([0-9A-Za-z]+);?(?: .*)?$")
_CLIENT = re.compile(r"\[([^\[\]]+)\]\)$")
_CLAIM_LINE = re.compile(r"\r?\n[ \t]+\(Authenticated sender:[^()\r\n]*\)(?=\r?\n|$)")
_CLAIM = re.compile(r"\(Authenticated sender:[^()\r\n]*\)")


@dataclass
class RawMail:
    """Headers as (name, value): the value keeps its folding ("\\r\\n\\t...") and raw 8-bit bytes (surrogate-escaped,
    as pymilter hands them to the milter), so an untouched header goes out byte for byte as it came."""

    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Submitter:
    """What Postfix's own Received header says about the mail; empty strings where it says nothing."""

    login: str = ""
    queue_id: str = ""
    client_addr: str = ""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse(data: bytes) -> RawMail:
    """Split a mail into header fields and body; never raises.

    The header block ends at the first empty line, or at the first line that is neither a field nor a
    continuation (a broken mail: that line and the rest are body, as Postfix itself reads such a mail).
    """
    headers: list[tuple[str, str]] = []
    pos = 0
    size = len(data)
    while pos < size:
        nl = data.find(b"\n", pos)
        end = size if nl < 0 else nl + 1
        line = data[pos:end].rstrip(b"\r\n")
        if not line:
            pos = end
            break
        if line[:1] in (b" ", b"\t"):
            if not headers:
                break
            name, previous = headers[-1]
            headers[-1] = (name, previous + "\r\n" + _text(line))
        else:
            m = _FIELD.match(line)
            if m is None:
                break
            rest = line[m.end() :]
            headers.append((m.group(1).decode("ascii"), _text(rest[1:] if rest[:1] == b" " else rest)))
        pos = end
    return RawMail(headers, data[pos:])


def submitter(headers: list[tuple[str, str]]) -> Submitter:
    """Login, queue id and client address from the topmost Received header, if Postfix wrote them there."""
    top = next((value for name, value in headers if name.lower() == "received"), None)
    if top is None:
        return Submitter()
    lines = re.split(r"\r?\n", top)
    client = _CLIENT.search(lines[0].rstrip())
    login = ""
    queue_id = ""
    for line in lines[1:]:
        by = _BY_LINE.match(line)
        if by:
            queue_id = by.group(2)
            # Postfix names an authenticated session's protocol ESMTPA or ESMTPSA: a login line without it is
            # not one Postfix wrote.
            if not by.group(1).upper().endswith("A"):
                login = ""
            break
        auth = _AUTH_LINE.match(line)
        if auth:
            login = auth.group(1).strip()
    else:
        # No "by" line: not a Received header Postfix's smtpd wrote, so nothing in it is trusted.
        return Submitter()
    return Submitter(login, queue_id, client.group(1) if client else "")


def without_login_claims(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers with every "(Authenticated sender: ...)" removed from every Received header."""
    return [
        (name, _CLAIM.sub("", _CLAIM_LINE.sub("", value)) if name.lower() == "received" else value)
        for name, value in headers
    ]


def _one_line(value: str) -> str:
    # A value we did not receive must not start a new header line, whatever it holds.
    return re.sub(r"\r\n|\r|\n", " ", value)


def render(headers: list[tuple[str, str]], body: bytes, received: list[tuple[str, str]]) -> bytes:
    """The mail as bytes: headers as received go out unchanged, ours are made one line and folded."""
    untouched = set(received)
    lines = []
    for name, value in headers:
        text = value if (name, value) in untouched else fold(name, _one_line(value))
        lines.append(f"{name}:{' ' if text else ''}{text}\r\n".encode("utf-8", "surrogateescape"))
    return b"".join(lines) + b"\r\n" + body
