"""The pure pipeline: (envelope, headers, body, config, store) -> verdict plus history records.

No I/O here but what the store it is handed does.  :func:`process` is the one place where an unexpected
exception or a dead Redis becomes the configured fail-safe verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.header import Header
from email.utils import getaddresses

from postroom import replies, subject
from postroom.config import Config, MailboxConfig
from postroom.history import Record
from postroom.log import message_logger
from postroom.store import NewTicket, StoreUnavailable, Ticket, TicketStore
from postroom.verdict import (
    AddHeader,
    AddRecipient,
    Edit,
    Envelope,
    RemoveHeader,
    RemoveRecipient,
    SetHeader,
    Verdict,
)

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


@dataclass
class Outcome:
    verdict: Verdict
    records: list[Record] = field(default_factory=list)


@dataclass(frozen=True)
class _Routed:
    key: str
    box: MailboxConfig
    rcpts: tuple[str, ...]  # the envelope recipients that named this mailbox


def process(message: Message, config: Config, store: TicketStore, now: float) -> Outcome:
    """Run the pipeline; never raises.  The failure policy of DESIGN.md lives here and nowhere else."""
    log = message_logger(message.envelope.queue_id)
    try:
        if message.envelope.auth_login:
            # Authenticated submissions are the outbound path (agents' replies), not customer mail.
            return Outcome(Verdict.accept(summary="authenticated submission: passed through"))
        return inbound(message, config, store, now)
    except StoreUnavailable as exc:
        log.error("ticket store unavailable: %s; policy %s", exc, config.milter.on_error)
        return _fail_safe(message, config, replies.S451_STORE_UNAVAILABLE)
    except Exception:
        # Our bug, not the customer's: deliver (or retry) rather than lose or bounce the mail.
        log.exception("unexpected error in the pipeline; policy %s", config.milter.on_error)
        return _fail_safe(message, config, replies.S451_TEMPORARY_FAILURE)


def _fail_safe(message: Message, config: Config, reply: replies.Reply) -> Outcome:
    if config.milter.on_error == "tempfail":
        return Outcome(Verdict.tempfail(reply, summary="tempfail by policy"))
    return Outcome(
        Verdict.accept(
            *_strip_internal(message.headers),
            AddHeader(STATUS_HEADER, "degraded"),
            summary="degraded delivery",
        )
    )


def _strip_internal(headers: Iterable[tuple[str, str]]) -> list[Edit]:
    """Remove every X-Postroom-* header that came from outside: only we may say who owns a ticket."""
    names: dict[str, str] = {}
    for name, _ in headers:
        if name.lower().startswith(INTERNAL_PREFIX):
            names.setdefault(name.lower(), name)
    return [RemoveHeader(n) for n in names.values()]


def _route(envelope: Envelope, config: Config) -> list[_Routed]:
    found: dict[str, tuple[MailboxConfig, list[str]]] = {}
    for rcpt in envelope.rcpts:
        hit = config.mailbox_for(rcpt)
        if hit is None:
            continue
        key, box, _detail = hit
        found.setdefault(key, (box, []))[1].append(rcpt)
    return [_Routed(key, box, tuple(rcpts)) for key, (box, rcpts) in found.items()]


def _addresses(value: str | None) -> list[str]:
    if not value:
        return []
    return [addr.lower() for _, addr in getaddresses([subject.one_line(value)]) if "@" in addr]


def _message_id(value: str | None) -> str:
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


def _decide(
    store: TicketStore,
    routed: _Routed,
    info: subject.SubjectInfo,
    refs: list[str],
    senders: list[str],
) -> tuple[Ticket | None, int, str]:
    """Which ticket this mail continues: (ticket or None for a new one, ticket to link, why)."""
    box = routed.box
    numbers = subject.numbers_for(info, box.tag)
    found = store.lookup(box.address, refs, numbers, senders)
    known_token = next((c.ticket for c in found.by_token if c.sender_known), None)
    previous = found.by_reference or known_token
    if info.is_forward and box.forward_prefixes_link:
        # A forward is a new conversation about an old one (often to a new person): link, don't merge.
        return None, previous.number if previous else 0, "forward"
    if found.by_reference:
        return found.by_reference, 0, "references"
    if known_token:
        return known_token, 0, "subject token"
    if found.by_token:
        # A stranger quoting someone else's ticket number must not read or join that ticket (Zammad #5064).
        stray = ", ".join(f"#{c.ticket.number}" for c in found.by_token)
        return None, 0, f"token {stray} from a sender who is not a participant"
    return None, 0, "new"


def inbound(message: Message, config: Config, store: TicketStore, now: float) -> Outcome:
    log = message_logger(message.envelope.queue_id)
    routed = _route(message.envelope, config)
    edits: list[Edit] = _strip_internal(message.headers)
    if not routed:
        return Outcome(Verdict.accept(*edits, summary="no shared mailbox among the recipients"))

    raw_subject = message.header("Subject")
    text_subject = readable(raw_subject or "")
    info = subject.parse(text_subject)
    refs = subject.message_ids(message.header("References"), message.header("In-Reply-To"))
    own_id = _message_id(message.header("Message-ID"))
    from_addrs = _addresses(message.header("From"))
    envelope_sender = message.envelope.mail_from.strip("<>").lower()
    senders = list(dict.fromkeys([*from_addrs, *([envelope_sender] if envelope_sender else [])]))
    customer = from_addrs[0] if from_addrs else envelope_sender

    new_subject = text_subject
    records: list[Record] = []
    headers: list[Edit] = []
    recipient_edits: list[Edit] = []
    summaries: list[str] = []
    for r in routed:
        ticket, linked, why = _decide(store, r, info, refs, senders)
        if ticket is None:
            # A stranger's or a forwarded ticket's token is not this ticket's name.
            base_subject = subject.strip_token(text_subject, r.box.tag)
            ticket = store.open(
                r.box.address,
                NewTicket(
                    customer=customer,
                    subject=base_subject[:300],
                    participants=tuple(senders),
                    message_ids=(own_id,) if own_id else (),
                    linked=linked,
                ),
                now,
            )
            event = "linked" if linked else "opened"
        else:
            ticket = store.touch(r.box.address, ticket.number, [own_id] if own_id else [], senders, now)
            event = "followup"
        mark = f"{r.box.tag} #{ticket.number}"
        log.info(
            "mailbox %s ticket #%d %s (%s) owner=%s",
            r.box.address,
            ticket.number,
            event,
            why,
            ticket.owner or "unassigned",
        )
        summaries.append(f"{mark} {event}")
        new_subject = subject.with_token(new_subject, r.box.tag, ticket.number)
        headers += [
            AddHeader("X-Postroom-Ticket", f"{ticket.number} ({r.box.tag})"),
            AddHeader("X-Postroom-Owner", f"{ticket.owner or 'unassigned'} ({mark})"),
            AddHeader("X-Postroom-State", f"{ticket.state} ({mark})"),
            AddHeader("X-Postroom-Priority", f"{ticket.priority} ({mark})"),
        ]
        if ticket.tags:
            headers.append(AddHeader("X-Postroom-Tags", f"{' '.join(ticket.tags)} ({mark})"))
        if ticket.linked:
            headers.append(AddHeader("X-Postroom-Linked", f"{ticket.linked} ({mark})"))
        folder = config.agent_folder(ticket.owner) if ticket.owner in config.agents else r.box.inbox_folder
        recipient_edits += _reroute(r.rcpts, config.recipient_delimiter, folder)
        records.append(
            Record(
                mailbox=r.box.address,
                number=ticket.number,
                event=event,
                at=now,
                customer=ticket.customer,
                ticket_subject=ticket.subject,
                owner=ticket.owner,
                state=ticket.state,
                priority=ticket.priority,
                linked=ticket.linked,
                message_id=own_id,
                direction="inbound",
                queue_id=message.envelope.queue_id,
                from_addr=customer,
                subject=text_subject[:1000],
                actor=customer,
                detail=why,
            )
        )
    edits.append(SetHeader("Subject", encode_header_value(new_subject)))
    edits += headers
    edits += recipient_edits
    return Outcome(Verdict.accept(*edits, summary="; ".join(summaries)), records)


def _reroute(rcpts: Sequence[str], delimiter: str, folder: str) -> list[Edit]:
    edits: list[Edit] = []
    targets: set[str] = set()
    for rcpt in rcpts:
        target = folder_address(rcpt, delimiter, folder)
        if target.lower() == rcpt.strip("<>").lower():
            targets.add(target.lower())
            continue
        edits.append(RemoveRecipient(rcpt))
        if target.lower() not in targets:
            # support@ and support+x@ in one mail must still make one delivery, not two.
            edits.append(AddRecipient(target))
            targets.add(target.lower())
    return edits
