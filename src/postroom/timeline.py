"""Reads the SQL history back as one timeline per ticket, for SLA due times, reminders, digests and stats.

Only reads: the daemons and ``postroom remind`` write the history through :mod:`postroom.history`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import select, true
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom.history_rows import EventRow, MessageRow, TicketRow
from postroom.tickets import tags_of


def aware(moment: dt.datetime) -> dt.datetime:
    # SQLite hands timestamps back without their zone; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Event:
    kind: str
    actor: str
    detail: str
    at: dt.datetime


@dataclass
class Timeline:
    """A ticket as the history has it: its last known state and its events in order."""

    mailbox: str
    number: int
    customer: str
    subject: str
    owner: str
    state: str
    priority: str
    created: dt.datetime
    events: list[Event] = field(default_factory=list)
    first_message_id: str = ""
    tags: tuple[str, ...] = ()  # as of the ticket's last record (empty for tickets last written before schema 0003)

    @property
    def closed_at(self) -> dt.datetime | None:
        closes = [e.at for e in self.events if e.kind == "close"]
        return closes[-1] if closes else None

    def noticed(self, detail: str) -> bool:
        """Whether ``postroom remind`` has already sent the notice with this detail."""
        return any(e.kind == "notice" and e.detail == detail for e in self.events)

    def state_at(self, moment: dt.datetime) -> str:
        """ "closed" when the last close or reopen before ``moment`` was a close, else "open"."""
        state = "open"
        for e in self.events:
            if e.at > moment:
                break
            if e.kind == "close":
                state = "closed"
            elif e.kind in ("reopen", "reopened"):
                state = "open"
        return state


def load(engine: Engine, *, open_only: bool = False) -> list[Timeline]:
    """Every ticket with its events in the order they happened; ``open_only``: only tickets not closed.

    ``postroom remind`` and the metrics need only the open tickets, which stay few while the history grows.
    """
    wanted = TicketRow.state != "closed" if open_only else true()
    with Session(engine) as session:
        rows = session.scalars(select(TicketRow).where(wanted).order_by(TicketRow.id)).all()
        by_id = {
            r.id: Timeline(
                r.mailbox,
                r.number,
                r.customer,
                r.subject,
                r.owner,
                r.state,
                r.priority,
                aware(r.created_at),
                tags=tags_of(r.tags),
            )
            for r in rows
        }
        events = session.execute(
            select(EventRow.ticket_id, EventRow.kind, EventRow.actor, EventRow.detail, EventRow.at)
            .join(TicketRow, TicketRow.id == EventRow.ticket_id)
            .where(wanted)
            .order_by(EventRow.at, EventRow.id)
        )
        for ticket_id, kind, actor, detail, at in events:
            t = by_id.get(ticket_id)
            if t is not None:
                t.events.append(Event(kind, actor, detail, aware(at)))
        messages = session.execute(
            select(MessageRow.ticket_id, MessageRow.message_id)
            .join(TicketRow, TicketRow.id == MessageRow.ticket_id)
            .where(wanted, MessageRow.message_id != "")
            .order_by(MessageRow.at.desc(), MessageRow.id.desc())
        )
        for ticket_id, message_id in messages:
            t = by_id.get(ticket_id)
            if t is not None:
                t.first_message_id = message_id  # the earliest wins: rows come newest first
    return list(by_id.values())
