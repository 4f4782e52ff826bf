"""The domain: a ticket, what may change it, and what the pipeline asks of the stores that keep it.

No driver here (neither Redis nor SQL): the pipeline, the history, the MIME edits and the CLI speak of these
objects; the adapters in :mod:`postroom.store` (Redis, and an in-memory store for tests and ``rules test``) and
:mod:`postroom.history` (SQL) turn them into keys and rows.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

PRIORITIES = ("low", "normal", "high", "urgent")
# Tags travel comma-separated in Redis and space-separated in X-Postroom-Tags and Keywords: neither may be in one.
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


def tags_text(tags: Iterable[str]) -> str:
    """Tags as Redis's ticket hash and the history keep them: comma-separated (TAG_RE allows no comma)."""
    return ",".join(tags)


def tags_of(text: str) -> tuple[str, ...]:
    """The tags of :func:`tags_text`'s form ("" is none)."""
    return tuple(t for t in text.split(",") if t)


class StoreUnavailable(RuntimeError):
    """Redis did not answer; the caller applies the failure policy."""


@dataclass(frozen=True)
class Ticket:
    mailbox: str
    number: int
    owner: str = ""  # agent login, "" for unassigned
    state: str = "new"
    priority: str = "normal"
    tags: tuple[str, ...] = ()
    customer: str = ""
    subject: str = ""
    created: float = 0.0
    updated: float = 0.0
    linked: int = 0  # the ticket a forward was split from


@dataclass(frozen=True)
class Candidate:
    """A ticket named by a subject token, and whether the sender may use that token."""

    ticket: Ticket
    sender_known: bool


@dataclass
class Lookup:
    by_reference: Ticket | None = None  # the ticket the first indexed Message-ID points to
    by_token: list[Candidate] = field(default_factory=list)


@dataclass(frozen=True)
class NewTicket:
    customer: str
    subject: str
    participants: tuple[str, ...]
    message_ids: tuple[str, ...]
    owner: str = ""
    state: str = "new"
    priority: str = "normal"
    linked: int = 0
    tags: tuple[str, ...] = ()


class TicketStore(Protocol):
    """What the pipeline needs; :class:`RedisStore` in production, an in-memory fake in unit tests."""

    def lookup(self, mailbox: str, message_ids: list[str], numbers: list[int], senders: list[str]) -> Lookup: ...

    def open(self, mailbox: str, new: NewTicket, now: float) -> Ticket: ...

    def open_unless_seen(self, mailbox: str, new: NewTicket, message_id: str, now: float) -> tuple[Ticket, bool]: ...

    def touch(
        self, mailbox: str, number: int, message_ids: Iterable[str], participants: Iterable[str], now: float
    ) -> Ticket: ...

    def claim(self, mailbox: str, number: int, login: str, now: float, *, force: bool = False) -> Claim: ...

    def update(self, mailbox: str, number: int, changes: Changes, now: float) -> Ticket: ...

    def update_unless_touched(
        self, mailbox: str, number: int, changes: Changes, now: float, updated: float
    ) -> Ticket | None:
        """``update``, only if the ticket's update time is still ``updated``: None when anything touched it since
        (the backlog's void must not close a ticket a retry of its mail has just taken)."""
        ...

    def set_away(self, mailbox: str, login: str, until: float | None, now: float) -> None: ...

    def clear_away(self, mailbox: str, login: str) -> None: ...

    def away(self, mailbox: str, logins: Iterable[str]) -> set[str]: ...

    def owned(self, mailbox: str, login: str) -> list[Ticket]:
        """The agent's open tickets (owned, not closed), in time linear in their number (#away's hand-over)."""
        ...

    def tickets(self, mailbox: str) -> list[Ticket]: ...


KEEP = "\0"


@dataclass(frozen=True)
class Changes:
    """What an agent's commands do to one ticket; KEEP leaves a field unchanged."""

    owner: str = KEEP
    state: str = KEEP
    priority: str = KEEP
    add_tags: tuple[str, ...] = ()
    remove_tags: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self != Changes()


@dataclass(frozen=True)
class Claim:
    won: bool
    ticket: Ticket  # after the claim: owned by the claimer when won, by the rival otherwise
    previous_owner: str  # "" when the ticket was unowned
    owned_since: float  # when the current owner took it


# A record's key: this process's random prefix and a counter (unique across processes and restarts without the
# cost of a uuid4 per record on the mail path).
_KEY_PREFIX = uuid.uuid4().hex[:16]
_key_counter = itertools.count(1)


def new_record_key() -> str:
    return f"{_KEY_PREFIX}{next(_key_counter):x}"


@dataclass(frozen=True)
class Record:
    """One mail's (or one command's) effect on one ticket, as the pipeline reports it.

    ``direction`` is the message row's: "inbound", "outbound", "note", "refused" (a submission Postfix was told to
    refuse), or "" for an event that is not a message of its own (a command in a mail whose message row another
    record carries, an admin's change).  ``key`` is unique per record and stays with it through the history's
    spool, so a record delivered twice is stored once.
    """

    mailbox: str
    number: int
    event: str
    at: float
    customer: str = ""
    ticket_subject: str = ""
    owner: str = ""
    state: str = "new"
    priority: str = "normal"
    linked: int = 0
    tags: str = ""  # the ticket's tags after the event, comma-separated as in Redis
    message_id: str = ""
    direction: str = "inbound"
    queue_id: str = ""
    from_addr: str = ""
    subject: str = ""
    actor: str = ""
    detail: str = ""
    key: str = field(default_factory=new_record_key)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Record:
        """A record read back from the spool; unknown fields (a newer version's) are ignored."""
        return Record(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})

    @staticmethod
    def of(
        ticket: Ticket,
        event: str,
        at: float,
        *,
        direction: str,
        queue_id: str,
        message_id: str,
        actor: str,
        subject: str,
        detail: str = "",
    ) -> Record:
        """A record of ``event`` on the ticket as it is now, by ``actor`` (a customer's address or a login)."""
        return Record(
            mailbox=ticket.mailbox,
            number=ticket.number,
            event=event,
            at=at,
            customer=ticket.customer,
            ticket_subject=ticket.subject,
            owner=ticket.owner,
            state=ticket.state,
            priority=ticket.priority,
            linked=ticket.linked,
            tags=tags_text(ticket.tags),
            message_id=message_id,
            direction=direction,
            queue_id=queue_id,
            from_addr=actor,
            subject=subject[:1000],
            actor=actor,
            detail=detail,
        )


_RECORD_FIELDS = frozenset(f.name for f in fields(Record))


@dataclass(frozen=True)
class Pending:
    """A mail postroom could not decide, for one shared mailbox: what its ticket needs once the store is back.

    ``kind`` is "degraded" (delivered as it came: it gets its ticket) or "tempfailed" (refused with a 451: the
    sender sends it again, and only a ticket the failed call may still have opened is settled, see
    postroom.backlog).  ``open_key`` is what the pipeline opened its ticket under (its Message-ID, or for a mail
    without one an ID derived from its headers).
    """

    mailbox: str
    message_id: str
    customer: str
    senders: tuple[str, ...]
    subject: str
    queue_id: str
    at: float
    open_key: str = ""
    kind: str = "degraded"

    @property
    def key(self) -> str:
        return self.open_key or self.message_id

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Pending:
        return Pending(
            mailbox=str(data["mailbox"]),
            message_id=str(data.get("message_id", "")),
            customer=str(data.get("customer", "")),
            senders=tuple(str(s) for s in data.get("senders", ())),
            subject=str(data.get("subject", "")),
            queue_id=str(data.get("queue_id", "")),
            at=float(data.get("at", 0.0)),
            open_key=str(data.get("open_key", "")),
            kind=str(data.get("kind", "degraded")),
        )


class AssignmentState(Protocol):
    """Presence, turns and loads of agents, per mailbox (its shared address).

    The two ``pick_*`` methods choose among the agents who are not away and count the ticket for the chosen one in
    the same atomic step, so two mails at once never get the same turn; they return "" when nobody is present.
    """

    def away(self, mailbox: str, agents: Sequence[str]) -> set[str]: ...

    def pick_round_robin(self, mailbox: str, group: str, agents: Sequence[str]) -> str: ...

    def pick_least_open(self, mailbox: str, agents: Sequence[str]) -> str: ...

    def count_assigned(self, mailbox: str, agent: str) -> None: ...

    def count_released(self, mailbox: str, agent: str) -> None: ...

    def open_counts(self, mailbox: str, agents: Sequence[str]) -> dict[str, int]: ...

    def allow(self, mailbox: str, correspondent: str, limit: int) -> bool: ...


def recount(assign: AssignmentState | None, mailbox: str, before: Ticket, after: Ticket) -> None:
    """Keep the open-ticket counts that least-open assignment reads in step with an ownership change."""
    if assign is None:
        return
    was = before.owner if before.owner and before.state != "closed" else ""
    now = after.owner if after.owner and after.state != "closed" else ""
    if was == now:
        return
    if was:
        assign.count_released(mailbox, was)
    if now:
        assign.count_assigned(mailbox, now)
