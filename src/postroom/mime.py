"""Header and address helpers shared by the inbound and outbound paths, and the Message an adapter collects.

Everything here reads text a stranger wrote: it accepts any input and never raises, and nothing it returns for a
header can contain a line break.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.header import Header
from email.utils import getaddresses

from postroom import subject
from postroom.tickets import Ticket
from postroom.verdict import AddHeader, Edit, Envelope, RemoveHeader, SetHeader

INTERNAL_PREFIX = "x-postroom-"
STATUS_HEADER = "X-Postroom-Status"

BodyAccess = Callable[[], bytes]


@dataclass
class Message:
    """Everything an adapter collected about one mail; headers are (name, raw value) in arrival order."""

    envelope: Envelope
    headers: list[tuple[str, str]]
    body: BodyAccess = field(default=lambda: b"")
    _first: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def header(self, name: str) -> str | None:
        """The first header of that name (any case).  Headers must not change once this is called."""
        if self._first is None:
            # The pipeline asks for several headers of every mail; one pass over a mail's 20-40 headers
            # answers them all.
            first: dict[str, str] = {}
            for key, value in self.headers:
                first.setdefault(key.lower(), value)
            self._first = first
        return self._first.get(name.lower())

    def header_names(self) -> set[str]:
        return {k for k, _ in self.headers}


def strip_internal(headers: Iterable[tuple[str, str]]) -> list[Edit]:
    """Remove every X-Postroom-* header that came from outside: only we may say who owns a ticket."""
    names: dict[str, str] = {}
    for name, _ in headers:
        if name.lower().startswith(INTERNAL_PREFIX):
            names.setdefault(name.lower(), name)
    return [RemoveHeader(n) for n in names.values()]


def addresses(value: str | None) -> list[str]:
    if not value:
        return []
    return [addr.lower() for _, addr in getaddresses([subject.one_line(value)]) if "@" in addr]


def message_id(value: str | None) -> str:
    ids = subject.message_ids(value)
    return ids[0] if ids else ""


def encode_header_value(text: str) -> str:
    """ASCII stays as it is; anything else becomes one RFC 2047 word list, never folded, never multi-line."""
    text = subject.one_line(text)
    if text.isascii():
        return text
    return Header(text, "utf-8").encode(maxlinelen=0)


def readable(raw: str) -> str:
    """A header value as text: RFC 2047 decoded; raw 8-bit bytes (surrogate-escaped by pymilter) as UTF-8, or
    as Windows-1252 when they are not UTF-8, which is what old clients that send raw 8-bit headers mean."""
    text = subject.decode(raw)
    data = text.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def folder_address(rcpt: str, delimiter: str, folder: str) -> str:
    """support@d or support+x@d -> support+<folder>@d (or the bare address for the inbox)."""
    local, _, domain = rcpt.strip("<>").rpartition("@")
    base = local.split(delimiter, 1)[0]
    return f"{base}{delimiter}{folder}@{domain}" if folder else f"{base}@{domain}"


# Importance and X-Priority as Outlook and Thunderbird show them.
_PRIORITY_HEADERS = {
    "urgent": ("high", "1 (Highest)"),
    "high": ("high", "2 (High)"),
    "low": ("low", "5 (Lowest)"),
}


def ticket_headers(ticket: Ticket, mark: str) -> list[Edit]:
    """The headers that show a ticket's state in a plain mail client; ``mark`` is "Support #17"."""
    edits: list[Edit] = [
        AddHeader("X-Postroom-Ticket", f"{ticket.number} ({mark.split(' #', maxsplit=1)[0]})"),
        AddHeader("X-Postroom-Owner", f"{ticket.owner or 'unassigned'} ({mark})"),
        AddHeader("X-Postroom-State", f"{ticket.state} ({mark})"),
        AddHeader("X-Postroom-Priority", f"{ticket.priority} ({mark})"),
    ]
    if ticket.tags:
        edits.append(AddHeader("X-Postroom-Tags", f"{' '.join(ticket.tags)} ({mark})"))
        edits.append(SetHeader("Keywords", ", ".join(ticket.tags)))
    if ticket.linked:
        edits.append(AddHeader("X-Postroom-Linked", f"{ticket.linked} ({mark})"))
    if ticket.priority in _PRIORITY_HEADERS:
        importance, x_priority = _PRIORITY_HEADERS[ticket.priority]
        edits.append(SetHeader("Importance", importance))
        edits.append(SetHeader("X-Priority", x_priority))
    return edits
