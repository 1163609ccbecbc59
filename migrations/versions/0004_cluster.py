"""cluster: hosts (registry, heartbeat, epoch), sessions placed on a host; append-only on PostgreSQL

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

Several daemons may share one journal in PostgreSQL. `hosts` is a read table of the `host:<id>`
streams (registered, heartbeat, lost); `sessions.host_id`/`host_epoch` name the host a session
is placed on and the epoch of that host's registration (fencing). Nullable columns added last,
so SQLite's ALTER TABLE ADD COLUMN gives the same table as `schema.metadata.create_all`.
On PostgreSQL the events table gets its append-only trigger here (0001 made SQLite's).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

PG_APPEND_ONLY = (
    "CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'events are append-only'; END $$",
    "CREATE TRIGGER events_no_update BEFORE UPDATE ON events FOR EACH ROW EXECUTE FUNCTION events_append_only()",
    "CREATE TRIGGER events_no_delete BEFORE DELETE ON events FOR EACH ROW EXECUTE FUNCTION events_append_only()",
)


def upgrade() -> None:
    op.add_column("sessions", sa.Column("host_id", sa.String, nullable=True))
    op.add_column("sessions", sa.Column("host_epoch", sa.Integer, nullable=True))
    op.create_index("ix_sessions_host", "sessions", ["host_id"])
    op.create_table(
        "hosts",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("address", sa.String, nullable=False),
        sa.Column("cgroup_parent", sa.String, nullable=False),
        sa.Column("max_sessions", sa.Integer, nullable=False),
        sa.Column("cpu", sa.Float, nullable=False),
        sa.Column("mem_mb", sa.Integer, nullable=False),
        sa.Column("images", sa.JSON, nullable=False),
        sa.Column("registered_at", sa.String, nullable=False),
        sa.Column("heartbeat_at", sa.String, nullable=False),
        sa.Column("lost_at", sa.String, nullable=True),
        sa.Column("lost_reason", sa.String, nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        for ddl in PG_APPEND_ONLY:
            op.execute(ddl)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS events_no_delete ON events")
        op.execute("DROP TRIGGER IF EXISTS events_no_update ON events")
        op.execute("DROP FUNCTION IF EXISTS events_append_only()")
    op.drop_table("hosts")
    op.drop_index("ix_sessions_host", "sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("host_epoch")
        batch.drop_column("host_id")
