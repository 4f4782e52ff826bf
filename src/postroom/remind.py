"""``postroom remind``: reminders before a due time, escalations at a breach, unassigned tickets, follow-ups.

Run by a timer every few minutes.  Each notice is sent once per due time: the history records it (event
"notice", detail "<kind> <target> <due>") and a later run that finds the record sends nothing.  Notices never go
to a customer: reminders and follow-ups go into the owner's folder of the shared mailbox (``support+Meier@``),
escalations to the mailbox's leads, unassigned tickets into the team's inbox folder.  Every one is marked
``Auto-Submitted: auto-generated`` and sent from the null sender, so no auto-responder answers and nothing bounces.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import logging
import smtplib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Protocol

import redis
from redis.cluster import RedisCluster

from postroom import commands, redis_connect, sla
from postroom.config import Config, MailboxConfig, business_minutes
from postroom.mime import folder_address
from postroom.notice import NOTICE_HEADER
from postroom.store.keyspace import key_base
from postroom.tickets import Changes, Record, StoreUnavailable, TicketStore
from postroom.timeline import Timeline

log = logging.getLogger("postroom.remind")

WHAT = {
    "first_response": "first response",
    "next_response": "next response",
    "resolution": "resolution",
    "unassigned": "assignment",
    "followup": "follow-up",
}


@dataclass(frozen=True)
class Notice:
    kind: str  # reminder | escalation | unassigned | followup
    target: str  # first_response | next_response | resolution | unassigned | followup
    due: dt.datetime
    ticket: Timeline
    box: MailboxConfig
    rcpts: tuple[str, ...]  # a folder of the shared mailbox, or the leads' own addresses

    @property
    def detail(self) -> str:
        return f"{self.kind} {self.target} {sla.iso(self.due)}"

    @property
    def mark(self) -> str:
        return f"{self.box.tag} #{self.ticket.number}"


def _folder(config: Config, box: MailboxConfig, owner: str) -> tuple[str, ...]:
    folder = config.agent_folder(owner) if owner in config.agents else box.inbox_folder
    return (folder_address(box.address, config.recipient_delimiter, folder),)


def _leads(config: Config, box: MailboxConfig) -> tuple[str, ...]:
    if box.leads:
        return tuple(config.agents[x].address for x in box.leads)
    return _folder(config, box, "")  # no leads: the team's inbox sees the breach


def followup_due(t: Timeline) -> dt.datetime | None:
    """The due time of the ticket's last #remind / #pending until, unless the customer has written since."""
    for i in range(len(t.events) - 1, -1, -1):
        e = t.events[i]
        if e.kind in sla.CUSTOMER_EVENTS:
            return None
        if e.kind in ("remind", "pending"):
            at = commands.followup_at(e.kind, e.detail, e.at.timestamp())
            return None if at is None else dt.datetime.fromtimestamp(at, dt.UTC)
    return None


def plan(config: Config, timelines: list[Timeline], now: dt.datetime) -> list[Notice]:
    """Every notice due at ``now`` that has not been sent yet."""
    clock = sla.Clock(config.hours)
    boxes = {b.address: b for b in config.mailboxes.values()}
    out: list[Notice] = []
    for t in timelines:
        box = boxes.get(t.mailbox)
        if box is None or t.state == "closed":
            continue
        out += _ticket_notices(config, box, t, clock, now)
    return [n for n in out if not n.ticket.noticed(n.detail)]


def _ticket_notices(
    config: Config, box: MailboxConfig, t: Timeline, clock: sla.Clock, now: dt.datetime
) -> list[Notice]:
    out: list[Notice] = []
    before = business_minutes(config.sla.remind_before)
    pol = sla.policy(box, t.priority)
    for d in sla.open_dues(config, box, t, clock):
        if now >= d.at:
            out.append(Notice("escalation", d.kind, d.at, t, box, _leads(config, box)))
        elif t.owner and now >= clock.add(d.since, max(0, business_minutes(getattr(pol, d.kind)) - before)):
            out.append(Notice("reminder", d.kind, d.at, t, box, _folder(config, box, t.owner)))
    after = business_minutes(config.sla.unassigned_after)
    if not t.owner and t.state in ("new", "open") and after:
        due = clock.add(t.created, after)
        if now >= due:
            out.append(Notice("unassigned", "unassigned", due, t, box, _folder(config, box, "")))
    follow = followup_due(t)
    if follow is not None and now >= follow:
        out.append(Notice("followup", "followup", follow, t, box, _folder(config, box, t.owner)))
    return out


# The metrics read what the last run counted; a count older than this (remind stopped) is gone, not shown stale.
BREACHED_SECONDS = 3600


def breached_key(prefix: str, mailbox: str) -> str:
    return f"{key_base(prefix, mailbox)}sla:breached"


def breached(config: Config, timelines: list[Timeline], now: dt.datetime) -> dict[str, int]:
    """Open tickets past a due time, per mailbox address: ``postroom_sla_breached_tickets`` of the metrics."""
    clock = sla.Clock(config.hours)
    counts = dict.fromkeys((b.address for b in config.mailboxes.values()), 0)
    for t in timelines:
        box = next((b for b in config.mailboxes.values() if b.address == t.mailbox), None)
        if box is not None and any(d.at <= now for d in sla.open_dues(config, box, t, clock)):
            counts[box.address] += 1
    return counts


def publish_breached(client: redis.Redis | RedisCluster, prefix: str, counts: dict[str, int]) -> None:
    """Hand the counts to the daemons' /metrics through Redis: they need not read the history themselves."""
    try:
        for mailbox, count in counts.items():
            client.set(breached_key(prefix, mailbox), count, ex=BREACHED_SECONDS)
    except redis.RedisError as exc:
        log.warning("SLA breach counts not published for the metrics: %s", exc)


def build(config: Config, n: Notice, now: dt.datetime, message_id: str) -> EmailMessage:
    t = n.ticket
    msg = EmailMessage()
    msg["From"] = f"{n.box.tag} reminders <{n.box.address}>"
    msg["To"] = ", ".join(n.rcpts)
    titles = {
        "reminder": f"{WHAT[n.target]} due {sla.local(config, n.due)}",
        "escalation": f"{WHAT[n.target]} overdue since {sla.local(config, n.due)}",
        "unassigned": f"nobody has taken it since {sla.local(config, t.created)}",
        "followup": f"follow-up due {sla.local(config, n.due)}, no answer from the customer",
    }
    msg["Subject"] = f"[{n.mark}] {n.kind.capitalize()}: {titles[n.kind]}"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = f"<{message_id}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg[NOTICE_HEADER] = f"{n.kind} {t.number} ({n.mark})"
    msg["X-Postroom-Due"] = f"{sla.iso(n.due)} ({n.mark})"
    if t.first_message_id:
        msg["In-Reply-To"] = f"<{t.first_message_id}>"
        msg["References"] = f"<{t.first_message_id}>"
    owner = config.agent_name(t.owner) if t.owner in config.agents else "nobody"
    msg.set_content(
        f"{n.mark}: {titles[n.kind]}.\n\n"
        f"Customer: {t.customer}\nSubject:  {t.subject}\nOwner:    {owner}\nState:    {t.state}\n"
        f"Priority: {t.priority}\nOpened:   {sla.local(config, t.created)}\n\n"
        "Sent by postroom remind; answer the ticket as usual to stop these.\n"
    )
    return msg


Sender = Callable[[str, tuple[str, ...], bytes], None]
# A claim outlives any run; the history, which keeps the notice for good, is what later runs read.
CLAIM_SECONDS = 30 * 86400


class Claims(Protocol):
    """Who sends a notice: of two runs at once (two hosts with the timer) only the one that claims it."""

    def claim(self, n: Notice) -> bool: ...

    def release(self, n: Notice) -> None: ...


class RedisClaims:
    """One key per notice (``postroom:{support@...}:notice:17:<kind>:<target>:<due>``), set if absent."""

    def __init__(self, client: redis.Redis | RedisCluster, prefix: str) -> None:
        self._r = client
        self._prefix = prefix

    def key(self, n: Notice) -> str:
        return f"{key_base(self._prefix, n.box.address)}notice:{n.ticket.number}:{n.detail.replace(' ', ':')}"

    def claim(self, n: Notice) -> bool:
        try:
            return bool(self._r.set(self.key(n), "1", nx=True, ex=CLAIM_SECONDS))
        except redis.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc

    def release(self, n: Notice) -> None:
        try:
            self._r.delete(self.key(n))
        except redis.RedisError as exc:
            log.warning(
                "%s: claim of %s kept (%s): not retried for %d days", n.mark, n.detail, exc, CLAIM_SECONDS // 86400
            )


def wire(msg: EmailMessage) -> bytes:
    """The message as SMTP carries it: CRLF line ends (smtplib sends bytes unchanged, and a server that reads
    bare LF as no line end at all sees one line longer than RFC 5321 allows)."""
    return msg.as_bytes(policy=email.policy.SMTP)


def smtp_sender(config: Config) -> Sender:
    def send(mail_from: str, rcpts: tuple[str, ...], data: bytes) -> None:
        with smtplib.SMTP(config.mailer.host, config.mailer.port, timeout=config.mailer.timeout_seconds) as smtp:
            smtp.sendmail(mail_from, list(rcpts), data)

    return send


def send_all(
    config: Config, notices: list[Notice], store: TicketStore, send: Sender, now: dt.datetime, *, claims: Claims
) -> tuple[list[Record], int]:
    """Send each notice this run claims, then its history record; returns the records and how many failed."""
    records: list[Record] = []
    failed = 0
    for n in notices:
        domain = n.box.address.rpartition("@")[2]
        mid = f"postroom.notice.{uuid.uuid4().hex}@{domain}"
        data = wire(build(config, n, now, mid))
        try:
            if not claims.claim(n):
                log.info("%s: %s sent by another run", n.mark, n.detail)
                continue
        except StoreUnavailable as exc:
            log.error("%s: %s not sent: %s", n.mark, n.detail, exc)
            failed += 1
            continue
        try:
            # Before sending: the milter lets the notice through untouched (no ticket of its own in a shared
            # mailbox, its X-Postroom-* headers kept on the way to a lead's own address) only if its Message-ID
            # is indexed under the ticket.
            store.touch(n.box.address, n.ticket.number, [mid], [], now.timestamp())
            send("", n.rcpts, data)
        except (OSError, smtplib.SMTPException, StoreUnavailable) as exc:
            log.error("%s: %s not sent: %s", n.mark, n.detail, exc)
            claims.release(n)  # the next run tries again
            failed += 1
            continue
        state = n.ticket.state
        if n.kind == "followup" and state == "pending":
            # The customer stayed silent: the ticket is the owner's to act on again.
            try:
                state = store.update(n.box.address, n.ticket.number, Changes(state="open"), now.timestamp()).state
            except (StoreUnavailable, KeyError) as exc:
                log.warning("%s: follow-up sent, ticket left %s: %s", n.mark, state, exc)
        log.info("%s: %s sent to %s", n.mark, n.detail, ", ".join(n.rcpts))
        records.append(_record(n, mid, state, now))
    return records, failed


def _record(n: Notice, mid: str, state: str, now: dt.datetime) -> Record:
    t = n.ticket
    return Record(
        mailbox=t.mailbox,
        number=t.number,
        event="notice",
        at=now.timestamp(),
        customer=t.customer,
        ticket_subject=t.subject,
        owner=t.owner,
        state=state,
        priority=t.priority,
        message_id=mid,
        direction="notice",
        actor="postroom",
        detail=n.detail,
    )
