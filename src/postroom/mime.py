"""Header and address helpers shared by the inbound and outbound paths, and the Message an adapter collects.

Everything here reads text a stranger wrote: it accepts any input and never raises, and nothing it returns for a
header can contain a line break.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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


# "alice@customer.test" or "Alice Smith <alice@customer.test>": most From headers, whose one address this reads
# without the general parser (a third of the inbound path's header reading).  Anything else (quotes, comments,
# several addresses, encoded words, folding) goes to email.utils, which the fast path agrees with
# (tests/test_hostile_property.py).
_PLAIN_ADDRESS = r"[A-Za-z0-9_%+=-]+(?:\.[A-Za-z0-9_%+=-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
_ONE_ADDRESS = re.compile(rf" *(?:[A-Za-z0-9 ]*<({_PLAIN_ADDRESS})>|({_PLAIN_ADDRESS})) *")


def addresses(value: str | None) -> list[str]:
    """The header's mail addresses, lower case, each with an @."""
    if not value:
        return []
    plain = _ONE_ADDRESS.fullmatch(value)
    if plain is not None:
        return [(plain.group(1) or plain.group(2)).lower()]
    return [addr.lower() for _, addr in getaddresses([subject.one_line(value)]) if "@" in addr]


def message_id(value: str | None) -> str:
    ids = subject.message_ids(value)
    return ids[0] if ids else ""


# What a mail without a Message-ID is known by: headers a retry of the same mail repeats byte for byte (a sending
# MTA's next attempt, Postfix's next delivery from its queue, a mail client's second try).  Not the body: the milter
# does not keep it when nothing reads it.
_DERIVED_FROM = ("From", "Sender", "To", "Cc", "Date", "Subject")


def derived_id(message: Message, salt: str, domain: str) -> str:
    """A Message-ID for a mail that has none: the same each time the same mail is seen, another for another mail.

    Made from ``salt`` (the login outbound), the sender's headers with their Date to the second, hashed: a ticket
    opened for the mail under this ID is found again by the same mail (in the backlog after an outage, in a retry
    after a 451) instead of a second ticket leaving the first a ghost.  Without a Date, two mails of one sender
    with the same subject could not be told apart: the queue id is taken too, so they stay two tickets (and a
    retry, another queue file, is not recognised).  Hashed, so nothing a stranger wrote reaches a header
    through it.
    """
    digest = hashlib.sha256(salt.encode("utf-8", "replace"))
    for name in _DERIVED_FROM:
        digest.update(b"\0" + (message.header(name) or "").encode("utf-8", "replace"))
    if not message.header("Date"):
        digest.update(b"\0" + message.envelope.queue_id.encode("utf-8", "replace"))
    return f"postroom.{digest.hexdigest()[:32]}@{domain}"


# RFC 2047 allows 75 characters per encoded word and 76 per line; ours stay shorter so that even the first line,
# behind "Subject: ", keeps to that.
_WORD_MAX = 64
# A plain word longer than this is encoded too, so that it can be folded at all.
_PLAIN_MAX = 60
# What we copy from a stranger's subject into mail we write ourselves (the auto-reply): enough to recognise it.
COPY_MAX = 200
# The longest subject postroom rewrites (real subjects stay below 255 characters).  A milter can hand Postfix
# about 60 KB per header value (longer ones arrive cut), and 2,000 characters encode to 15 KB at most.  A longer
# subject arriving is left exactly as it came (the ticket shows in the X-Postroom headers); one we write (an
# agent's reply) is cut here, with an ellipsis.
SUBJECT_MAX = 2000
# Lines we write are folded near here (RFC 5322's "SHOULD" length); no line comes near the 998-byte limit.
_FOLD_AT = 78


def _encoded_words(run: str, charset: str) -> list[str]:
    """``run`` as RFC 2047 "B" words of at most _WORD_MAX characters, each holding whole characters only."""
    prefix = f"=?{charset}?b?"
    room = (_WORD_MAX - len(prefix) - 2) // 4 * 3  # bytes per word
    words: list[str] = []
    chunk: list[bytes] = []
    size = 0
    for char in run:
        try:
            # A raw byte that nothing could read (surrogate-escaped) travels as it came.
            data = char.encode(charset, "surrogateescape")
        except UnicodeEncodeError:
            data = b"?"
        if size + len(data) > room and chunk:
            words.append(prefix + base64.b64encode(b"".join(chunk)).decode("ascii") + "?=")
            chunk, size = [], 0
        chunk.append(data)
        size += len(data)
    if chunk:
        words.append(prefix + base64.b64encode(b"".join(chunk)).decode("ascii") + "?=")
    return words


def _plain(word: str) -> bool:
    return word.isascii() and len(word) <= _PLAIN_MAX and "=?" not in word


def encode_header_value(text: str, charset: str = "utf-8") -> str:
    """An unstructured header value (a subject) as one line of short plain and RFC 2047 words.

    Plain ASCII words stay as they are; every run of other words (non-ASCII, overlong, or looking like an encoded
    word) becomes encoded words of at most 64 characters, the spaces of the run inside them, so decoders give back
    exactly ``text`` (control characters flattened).  Linear in the length; never a line break: each adapter folds
    between the words (:func:`fold`).  ``charset`` is the one the text came in when it was raw 8-bit, so its bytes
    travel unchanged; text it cannot hold is written in UTF-8.
    """
    text = subject.one_line(text)
    try:
        text.encode(charset)
    except (UnicodeError, LookupError):
        charset = "utf-8"
    words = text.split(" ")
    encode = [bool(w) and not _plain(w) for w in words]
    # Empty words are runs of spaces: next to an encoded run they go inside it, where no decoder drops them.
    for order in (range(len(words)), range(len(words) - 1, -1, -1)):
        previous = False
        for i in order:
            if not words[i]:
                encode[i] = encode[i] or previous
            previous = encode[i]
    out: list[str] = []
    i = 0
    while i < len(words):
        j = i + 1
        while j < len(words) and encode[j] == encode[i]:
            j += 1
        run = " ".join(words[i:j])
        out += _encoded_words(run, charset) if encode[i] else [run]
        i = j
    return " ".join(out)


def fold(name: str, value: str, newline: str = "\r\n") -> str:
    """Fold a one-line value at its white space so lines stay near 78 characters; a long word stays whole.

    ``newline`` is "\\r\\n" in a mail we write, "\\n" for the milter protocol (libmilter's multi-line value).
    Only a line break is inserted before existing white space, which unfolding removes again: a DKIM signature
    over the unfolded value (relaxed) stays valid.
    """
    out: list[str] = []
    length = len(name) + 2
    has_word = False
    for token in re.findall(r"[ \t]+|[^ \t]+", value):
        if token[0] in " \t":
            out.append(token)
            length += len(token)
            continue
        if has_word and out[-1][0] in " \t" and length + len(token) > _FOLD_AT:
            length = len(out[-1])
            out[-1] = newline + out[-1]
        out.append(token)
        length += len(token)
        has_word = True
    return "".join(out)


def readable(raw: str) -> str:
    """A header value as text: RFC 2047 decoded; raw 8-bit bytes as :func:`raw_text` reads them."""
    return header_text(raw)[0]


def header_text(raw: str, hint: str = "") -> tuple[str, str]:
    """(text, charset) of a header value.  RFC 2047 words are decoded (charset "utf-8" for what we write back).

    Raw 8-bit bytes (surrogate-escaped by pymilter) are read as UTF-8; otherwise in the first of ``hint`` (the
    mail's own Content-Type charset), Windows-1252 (what old Western clients mean), Shift_JIS (the usual raw
    8-bit subject from Japan) and Latin-1 that decodes them exactly back to the same bytes, and that charset is
    returned, so writing the text back in it keeps the original bytes: never U+FFFD for a byte we could not read.
    """
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        data = subject.one_line(raw).encode("utf-8", "surrogateescape")
        for charset in ("utf-8", hint, "cp1252", "shift_jis", "latin-1"):
            text = _exact(data, charset)
            if text is not None:
                return text, charset
    return subject.decode(raw), "utf-8"


def _exact(data: bytes, charset: str) -> str | None:
    if not charset:
        return None
    try:
        codec = codecs.lookup(charset)
        text = data.decode(codec.name)
        # Only ASCII-compatible charsets that give the same bytes back: the token we add must stay ASCII.
        if "a".encode(codec.name) != b"a" or text.encode(codec.name) != data:
            return None
    except (LookupError, UnicodeError):
        return None
    return subject.one_line(text)


_CHARSET_RE = re.compile(r"""charset\s*=\s*["']?([A-Za-z0-9_.:-]{1,40})""", re.IGNORECASE)


def charset_hint(content_type: str | None) -> str:
    """The charset parameter of a Content-Type header, "" when there is none."""
    m = _CHARSET_RE.search(content_type or "")
    return m.group(1) if m else ""


def shorten(text: str, limit: int = COPY_MAX) -> str:
    """At most ``limit`` characters of ``text``, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


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
