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
from postroom.verdict import Edit, Envelope, RemoveHeader

INTERNAL_PREFIX = "x-postroom-"
STATUS_HEADER = "X-Postroom-Status"

BodyAccess = Callable[[], bytes]


@dataclass
class Message:
    """Everything an adapter collected about one mail; headers are (name, raw value) in arrival order."""

    envelope: Envelope
    headers: list[tuple[str, str]]
    body: BodyAccess = field(default=lambda: b"")

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None

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
