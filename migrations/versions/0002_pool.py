"""pre-warmed pool: sessions.pool marks pool members (idle, claiming, claimed)

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02

A nullable column added last, so SQLite's ALTER TABLE ADD COLUMN gives the same table as
`schema.metadata.create_all` (tests/test_migrations.py compares them). Existing rows are
ordinary sessions (NULL); no event changes meaning, so replay fills it the same way.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("pool", sa.String, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("pool")
