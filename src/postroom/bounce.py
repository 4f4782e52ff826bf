"""Delivery reports: which mail of ours a bounce reports on, and which recipients failed.

A delivery status notification (RFC 3464: ``multipart/report; report-type=delivery-status`` with a
``message/delivery-status`` part, and the returned mail as ``text/rfc822-headers`` or ``message/rfc822``) is how
Postfix, Exim, sendmail and Exchange/Outlook (an "NDR" is the same format) say that an agent's reply did not
arrive.  Older mailers send the returned mail as a plain ``message/rfc822`` attachment from MAILER-DAEMON with an
empty return path; that counts too, but only from a null sender or a mailer-daemon, so a customer who forwards our
reply as an attachment is not a bounce.

Everything here reads a stranger's mail: it never raises, and reads at most the first parts of a report.
"""

from __future__ import annotations

import email
import email.parser
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import Message as EmailMessage

from postroom import subject

# A report has three or four parts; a mail with hundreds is not one worth reading to the end.
_MAX_PARTS = 50
# A report says what it reports on in its first parts (the status, then the returned headers): a returned mail of
# 25 MB is read no further than this, so a report costs the same whatever it returns.
REPORT_BYTES = 256 * 1024
_RETURNED = ("text/rfc822-headers", "message/rfc822", "message/rfc822-headers")
# Senders that return mail (the local parts Postfix, sendmail, Exim and Exchange use).
_DAEMONS = ("mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon")


@dataclass(frozen=True)
class Report:
    """What a delivery report says: the reported mail's Message-IDs and the recipients it names."""

    message_ids: tuple[str, ...]  # oldest first, the reported mail's own Message-ID last (as References are)
    failures: tuple[tuple[str, str, str], ...]  # (recipient, action, status) for each failed or delayed recipient
    recipients: tuple[str, ...]  # every final recipient the report names

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def summary(self) -> str:
        """One line for the header and the history: "failed alice@customer.test 5.1.1; delayed ..."."""
        parts = [" ".join(x for x in (action, rcpt, status) if x) for rcpt, action, status in self.failures[:5]]
        more = len(self.failures) - 5
        return subject.one_line("; ".join(parts) + (f"; {more} more" if more > 0 else ""))[:300]


def _content_type(headers: Iterable[tuple[str, str]]) -> str:
    return next((v for k, v in headers if k.lower() == "content-type"), "").strip().lower()


def _daemon(address: str) -> bool:
    return address.strip("<> ").lower().rpartition("@")[0] in _DAEMONS


def might_be_report(mail_from: str, headers: Sequence[tuple[str, str]]) -> bool:
    """Whether a mail could be a delivery report, from what is known before its body: the adapters keep such a
    body for :func:`read_report` even when no rule reads bodies."""
    if _content_type(headers).startswith("multipart/report"):
        return True
    if not mail_from.strip("<> ") or _daemon(mail_from):
        return _content_type(headers).startswith("multipart/")
    return False


def read_report(mail_from: str, headers: Sequence[tuple[str, str]], body: bytes) -> Report | None:
    """The report in a mail, or None when it is none (or names no mail we could look up)."""
    if not might_be_report(mail_from, headers):
        return None
    head = "".join(f"{k}: {subject.one_line(v)}\r\n" for k, v in headers)
    try:
        parsed = email.message_from_bytes(head.encode("utf-8", "surrogateescape") + b"\r\n" + body)
        return _read(parsed, is_report=_content_type(headers).startswith("multipart/report"))
    except Exception:  # noqa: BLE001 - a stranger's broken MIME is not a report, whatever the parser trips on
        return None


def _read(parsed: EmailMessage, *, is_report: bool) -> Report | None:
    ids: list[str] = []
    failures: list[tuple[str, str, str]] = []
    recipients: list[str] = []
    has_status = False
    for count, part in enumerate(parsed.walk()):
        if count > _MAX_PARTS:
            break
        kind = part.get_content_type()
        if kind == "message/delivery-status":
            has_status = True
            for block in _status_blocks(part):
                _recipient(block, failures, recipients)
        elif kind in _RETURNED and not ids:
            ids = _returned_ids(part)
    if not ids or not (is_report or has_status or _returned_only(parsed)):
        return None
    return Report(tuple(ids), tuple(failures), tuple(dict.fromkeys(recipients)))


def _returned_only(parsed: EmailMessage) -> bool:
    # No report part: a returned mail attached by a mailer daemon (checked by might_be_report) still is one.
    return parsed.get_content_maintype() == "multipart"


def _status_blocks(part: EmailMessage) -> list[EmailMessage]:
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, EmailMessage)]
    # Some mailers send the status as text (a transfer encoding, or a wrong type): read it as header blocks.
    text = part.get_payload(decode=True)
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else str(payload)
    parser = email.parser.HeaderParser()
    return [parser.parsestr(block) for block in raw.replace("\r\n", "\n").split("\n\n") if block.strip()]


def _recipient(block: EmailMessage, failures: list[tuple[str, str, str]], recipients: list[str]) -> None:
    final = str(block.get("Final-Recipient") or block.get("Original-Recipient") or "")
    if not final:
        return
    address = subject.one_line(final.partition(";")[2] or final).strip("<> ").lower()
    action = subject.one_line(str(block.get("Action") or "")).lower()
    status = subject.one_line(str(block.get("Status") or "")).split(" ")[0]
    recipients.append(address)
    if action in ("failed", "delayed"):
        failures.append((address, action, status))


def _returned_ids(part: EmailMessage) -> list[str]:
    """Message-ID, then References and In-Reply-To, of the returned mail (the headers part or the whole mail)."""
    if part.get_content_type() == "message/rfc822" and part.is_multipart():
        inner = part.get_payload(0)
    else:
        text = part.get_payload(decode=True)
        raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(part.get_payload())
        inner = email.parser.HeaderParser().parsestr(raw.lstrip("\r\n"), headersonly=True)
    if not isinstance(inner, EmailMessage):
        return []
    own = subject.message_ids(str(inner.get("Message-ID") or ""))
    refs = subject.message_ids(str(inner.get("References") or ""), str(inner.get("In-Reply-To") or ""))
    return [r for r in refs if r not in own] + own[:1]
