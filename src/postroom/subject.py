"""Subject tokens (``[Support #17]``), reply and forward prefixes, and Message-ID lists.

All of this parses text a stranger wrote, so every function accepts any string and never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import decode_header, make_header

# Reply prefixes of the mail clients our users' customers use: English, German (AW), Scandinavian (SV),
# Dutch (Antw), Finnish (VS is "vastaus"), Polish (Odp), Italian (R, RIF), French (Réf), Spanish (RE), Chinese.
REPLY_PREFIXES = frozenset(
    {"re", "aw", "sv", "antw", "odp", "rif", "ref", "réf", "r", "vs", "ynt", "atb", "\u56de\u590d", "\u7b54\u590d"}
)
# Forward prefixes: English (Fwd, Fw), German (WG), Dutch (Doorst), French (TR), Spanish (RV), Portuguese (ENC),
# Swedish (VB), Polish (PD), Chinese, Norwegian/Danish (VS would clash with the Finnish reply, so it is left out).
FORWARD_PREFIXES = frozenset({"fwd", "fw", "wg", "doorst", "tr", "rv", "enc", "vb", "pd", "i", "\u8f6c\u53d1"})

# Chinese and Japanese clients write the prefix with a full-width colon.
_PREFIX_RE = re.compile(r"^\s*([^\W\d_]{1,6})\s*(?:\[\d{1,3}\]|\(\d{1,3}\))?\s*[:\uff1a]\s*", re.UNICODE)
_TOKEN_RE = re.compile(r"\[\s*([A-Za-z0-9][A-Za-z0-9 _.-]{0,31}?)\s*#\s*(\d{1,12})\s*\]")
_MSGID_RE = re.compile(r"<([^<>\s]{1,998})>")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class SubjectInfo:
    """What a subject says about threading."""

    prefixes: tuple[str, ...]  # lower-cased prefix words in order, "re", "fwd", ...
    tokens: tuple[tuple[str, int], ...]  # (tag, number) pairs found anywhere in the subject
    rest: str  # the subject without leading prefixes

    @property
    def is_forward(self) -> bool:
        return any(p in FORWARD_PREFIXES for p in self.prefixes[:1])

    @property
    def is_reply(self) -> bool:
        return any(p in REPLY_PREFIXES for p in self.prefixes[:1])


def decode(raw: str) -> str:
    """Decode RFC 2047 words; undecodable input comes back as it was, with control characters flattened."""
    try:
        text = str(make_header(decode_header(raw)))
    except (ValueError, LookupError, UnicodeError, AssertionError, HeaderParseError):
        # A broken encoded word (bad base64, say): the header as it came, still readable and still tokenable.
        text = raw
    return one_line(text)


def one_line(text: str) -> str:
    """Flatten CR, LF and other controls to single spaces: nothing we copy into a header may break a line."""
    return _CONTROL_RE.sub(" ", text).strip()


def parse(subject: str) -> SubjectInfo:
    prefixes: list[str] = []
    rest = subject
    # Bounded: a hostile "Re: Re: Re: ..." of megabytes must not cost more than a few dozen steps.
    for _ in range(32):
        m = _PREFIX_RE.match(rest)
        if not m:
            break
        word = m.group(1).lower()
        if word not in REPLY_PREFIXES and word not in FORWARD_PREFIXES:
            break
        prefixes.append(word)
        rest = rest[m.end() :]
    tokens = tuple((m.group(1).strip(), int(m.group(2))) for m in _TOKEN_RE.finditer(subject))
    return SubjectInfo(tuple(prefixes), tokens, rest.strip())


def numbers_for(info: SubjectInfo, tag: str) -> list[int]:
    """Ticket numbers of this mailbox's tag in the subject, first first."""
    wanted = tag.casefold()
    return [n for t, n in info.tokens if t.casefold() == wanted]


def token(tag: str, number: int) -> str:
    return f"[{tag} #{number}]"


def strip_token(subject: str, tag: str) -> str:
    """Remove every token of this tag (a stranger's or a forwarded one) and tidy the spaces."""
    wanted = tag.casefold()

    def repl(m: re.Match[str]) -> str:
        return "" if m.group(1).strip().casefold() == wanted else m.group(0)

    return re.sub(r"\s{2,}", " ", _TOKEN_RE.sub(repl, subject)).strip()


def with_token(subject: str, tag: str, number: int) -> str:
    """The subject carrying exactly ``[tag #number]`` for this tag.

    A reply keeps its prefixes in front ("Re: [Support #17] Hello", as RT and OTRS write it); a new ticket and a
    forward get the token first ("[Support #18] Fwd: Hello") because the forward is a new conversation.
    """
    mine = token(tag, number)
    info = parse(subject)
    if numbers_for(info, tag) == [number] and mine in subject:
        return one_line(subject)
    bare = strip_token(subject, tag)
    if info.is_reply:
        # Put the token after the reply prefixes the customer's client wrote.
        cut = len(bare) - len(parse(bare).rest)
        head, tail = bare[:cut].rstrip(), bare[cut:]
        return one_line(f"{head} {mine} {tail}".strip())
    return one_line(f"{mine} {bare}".strip())


def message_ids(*header_values: str | None) -> list[str]:
    """Message-IDs in References / In-Reply-To order, deduplicated, bounded to the last 50 a thread holds."""
    seen: dict[str, None] = {}
    for value in header_values:
        if not value:
            continue
        for m in _MSGID_RE.finditer(value):
            seen.setdefault(m.group(1), None)
    ids = list(seen)
    # References grow with a thread; the newest ids are the ones most likely indexed and still within TTL.
    return ids[-50:]
