"""Tickets, messages and events.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "tickets",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("mailbox", sa.String(320), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("customer", sa.String(320), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("linked", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("mailbox", "number", name="uq_tickets_mailbox_number"),
    )
    op.create_table(
        "messages",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("ticket_id", _ID, sa.ForeignKey("tickets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("message_id", sa.String(998), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("queue_id", sa.String(32), nullable=False),
        sa.Column("from_addr", sa.String(320), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_messages_ticket_id", "messages", ["ticket_id"])
    op.create_index("ix_messages_message_id", "messages", ["message_id"])
    op.create_table(
        "events",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("ticket_id", _ID, sa.ForeignKey("tickets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(320), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_events_ticket_id", "events", ["ticket_id"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("messages")
    op.drop_table("tickets")
