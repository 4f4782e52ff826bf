"""What the rules may look at in one mail, for one of the shared mailboxes it was sent to.

Built from the pipeline's :class:`postroom.mime.Message` with :meth:`MessageFacts.from_message`.  Header facts are
cheap; the body text and the attachment list need a MIME parse, so they are computed only when a rule asks for
them, and the parse is bounded, so a 25 MB attachment costs the rules nothing unless a rule reads bodies.
Everything here reads text a stranger wrote: it accepts any input and never raises.
"""

from __future__ import annotations

import email.errors
import email.parser
import email.policy
import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import Message as EmailMessage
from functools import cached_property

from postroom.body import chunks_of
from postroom.mime import Message, addresses, readable

# Enough for every text part of a real mail; beyond it the parse stops and what is left counts as not there.
MAX_PARSE_BYTES = 8 * 1024 * 1024
# Body conditions search this much text, so an admin's regex never runs over megabytes.
MAX_BODY_CHARS = 256 * 1024

_TAG_RE = re.compile(r"<[^>]*>")
_HIDDEN_RE = re.compile(r"<(style|script)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
# What the stdlib parser has raised on hostile MIME over the years; a mail it cannot read has no body for rules.
_PARSE_ERRORS = (
    email.errors.MessageError,
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    AssertionError,
    UnicodeError,
)


@dataclass(frozen=True)
class Attachment:
    content_type: str  # lower case, e.g. "application/pdf"
    filename: str


class MessageFacts:
    """Facts about one mail as one mailbox sees it; ``mailbox`` is the config key, e.g. "support"."""

    def __init__(
        self,
        *,
        mailbox: str,
        mailbox_address: str,
        headers: Sequence[tuple[str, str]],
        envelope_sender: str = "",
        body: bytes | Callable[[], bytes] = b"",
    ) -> None:
        self.mailbox = mailbox
        self.mailbox_address = mailbox_address.lower()
        self.headers = tuple(headers)
        self.envelope_sender = envelope_sender.strip().strip("<>").lower()
        self._body = body

    @classmethod
    def from_message(cls, message: Message, mailbox: str, mailbox_address: str) -> MessageFacts:
        return cls(
            mailbox=mailbox,
            mailbox_address=mailbox_address,
            headers=message.headers,
            envelope_sender=message.envelope.mail_from,
            body=message.body,
        )

    def header_values(self, name: str) -> list[str]:
        """Every value of a header, decoded for reading (RFC 2047, raw 8-bit)."""
        wanted = name.lower()
        return [readable(v) for k, v in self.headers if k.lower() == wanted]

    @cached_property
    def from_addresses(self) -> tuple[str, ...]:
        values = [v for k, v in self.headers if k.lower() == "from"]
        return tuple(addresses(values[0])) if values else ()

    @cached_property
    def senders(self) -> tuple[str, ...]:
        """The From addresses and the envelope sender: a rule on the sender matches either."""
        found = [*self.from_addresses, *([self.envelope_sender] if self.envelope_sender else [])]
        return tuple(dict.fromkeys(found))

    @cached_property
    def subject(self) -> str:
        values = self.header_values("Subject")
        return values[0] if values else ""

    @cached_property
    def _parsed(self) -> EmailMessage | None:
        head = b"".join(f"{k}: {v}\r\n".encode("utf-8", "surrogateescape") for k, v in self.headers)
        # Fed in chunks, only as much as is parsed: a 30 MB body is never joined or copied whole (the one-piece
        # parse of 8 MB peaked at several times that).
        parser = email.parser.BytesFeedParser(policy=email.policy.compat32)
        try:
            parser.feed(head + b"\r\n")
            for chunk in chunks_of(self._body, MAX_PARSE_BYTES):
                parser.feed(chunk)
            parsed: EmailMessage = parser.close()
            return parsed
        except _PARSE_ERRORS:
            return None

    @cached_property
    def _parts(self) -> tuple[tuple[str, ...], tuple[Attachment, ...]]:
        texts: list[str] = []
        htmls: list[str] = []
        found: list[Attachment] = []
        parsed = self._parsed
        if parsed is None:
            return (), ()
        try:
            for part in parsed.walk():
                if part.is_multipart():
                    continue
                ctype = part.get_content_type().lower()
                filename = readable(part.get_filename() or "")
                disposition = (part.get_content_disposition() or "").lower()
                if disposition == "attachment" or filename or not ctype.startswith(("text/", "message/")):
                    found.append(Attachment(ctype, filename))
                elif ctype == "text/plain":
                    texts.append(_decoded(part))
                elif ctype == "text/html":
                    htmls.append(_html_text(_decoded(part)))
        except _PARSE_ERRORS:
            pass  # keep what was read before the broken part
        return tuple(texts or htmls), tuple(found)

    @cached_property
    def body_text(self) -> str:
        """The text parts (HTML reduced to text when there is no plain part), at most MAX_BODY_CHARS."""
        return "\n".join(self._parts[0])[:MAX_BODY_CHARS]

    @cached_property
    def attachments(self) -> tuple[Attachment, ...]:
        return self._parts[1]


def _decoded(part: EmailMessage) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:  # a charset Python does not know
        return payload.decode("utf-8", "replace")


def _html_text(markup: str) -> str:
    return html.unescape(_TAG_RE.sub(" ", _HIDDEN_RE.sub(" ", markup)))
