"""The history's tables as ORM classes, for the admin commands and reports that query rows as objects.

The tables themselves are :mod:`postroom.history`'s Core tables (the daemons' history writer uses those alone, so
no daemon loads the ORM); these classes map onto the same ``Table`` objects, so there is one schema.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import DeclarativeBase, Mapped

from postroom.history import EVENTS, MESSAGES, METADATA, TICKETS


class Base(DeclarativeBase):
    metadata = METADATA


class TicketRow(Base):
    __table__ = TICKETS

    id: Mapped[int]
    mailbox: Mapped[str]
    number: Mapped[int]
    customer: Mapped[str]
    subject: Mapped[str]
    owner: Mapped[str]
    state: Mapped[str]
    priority: Mapped[str]
    linked: Mapped[int]
    tags: Mapped[str]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class MessageRow(Base):
    __table__ = MESSAGES

    id: Mapped[int]
    ticket_id: Mapped[int]
    message_id: Mapped[str]
    direction: Mapped[str]
    queue_id: Mapped[str]
    from_addr: Mapped[str]
    subject: Mapped[str]
    at: Mapped[datetime]


class EventRow(Base):
    __table__ = EVENTS

    id: Mapped[int]
    ticket_id: Mapped[int]
    kind: Mapped[str]
    actor: Mapped[str]
    detail: Mapped[str]
    at: Mapped[datetime]
    record_key: Mapped[str | None]
