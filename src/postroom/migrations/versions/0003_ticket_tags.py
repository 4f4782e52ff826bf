"""The ticket's tags, so that a rebuild of Redis from the history restores them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Comma-separated, as in Redis; "" for rows written before this revision (their tags are in tag events only).
    op.add_column("tickets", sa.Column("tags", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("tickets", "tags")
