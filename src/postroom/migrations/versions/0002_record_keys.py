"""A unique key per history record, so a record the spool delivers twice is stored once.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows written before this revision have no key, and NULLs never collide in a unique index.
    op.add_column("events", sa.Column("record_key", sa.String(32), nullable=True))
    op.create_index("ix_events_record_key", "events", ["record_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_events_record_key", table_name="events")
    op.drop_column("events", "record_key")
