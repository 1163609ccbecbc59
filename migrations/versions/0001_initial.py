"""initial journal: events (append-only) and the read tables

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written out by hand (not imported from sandkasten.store.schema) so later model changes
cannot rewrite what this migration did; tests/test_migrations.py proves the two agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APPEND_ONLY_TRIGGERS = (
    "CREATE TRIGGER events_no_update BEFORE UPDATE ON events "
    "BEGIN SELECT RAISE(ABORT, 'events are append-only'); END",
    "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
    "BEGIN SELECT RAISE(ABORT, 'events are append-only'); END",
)


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("stream_id", sa.String, nullable=False),
        sa.Column("stream_version", sa.Integer, nullable=False),
        sa.Column("type", sa.String, nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("actor", sa.String, nullable=False),
        sa.Column("request_id", sa.String, nullable=True),
        sa.Column("created_at", sa.String, nullable=False),
        sa.Column("prev_hash", sa.String, nullable=False),
        sa.Column("hash", sa.String, nullable=False),
        sa.UniqueConstraint("stream_id", "stream_version", name="uq_events_stream_version"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_events_type", "events", ["type"])
    if op.get_bind().dialect.name == "sqlite":
        for ddl in APPEND_ONLY_TRIGGERS:
            op.execute(ddl)

    op.create_table(
        "sessions",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("image", sa.String, nullable=False),
        sa.Column("workspace_id", sa.String, nullable=True),
        sa.Column("cpu_limit", sa.Float, nullable=False),
        sa.Column("mem_limit_mb", sa.Integer, nullable=False),
        sa.Column("pids_limit", sa.Integer, nullable=False),
        sa.Column("network_mode", sa.String, nullable=False),
        sa.Column("env", sa.JSON, nullable=False),
        sa.Column("ttl_seconds", sa.Integer, nullable=False),
        sa.Column("readonly_rootfs", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.String, nullable=False),
        sa.Column("updated_at", sa.String, nullable=False),
        sa.Column("expires_at", sa.String, nullable=False),
        sa.Column("ended_at", sa.String, nullable=True),
        sa.Column("runner_pid", sa.Integer, nullable=True),
        sa.Column("runner_start_time", sa.Integer, nullable=True),
        sa.Column("cgroup", sa.String, nullable=True),
        sa.Column("pooled", sa.Boolean, nullable=False),
        sa.Column("cwd", sa.String, nullable=False),
        sa.Column("exec_count", sa.Integer, nullable=False),
        sa.Column("last_activity_at", sa.String, nullable=False),
        sa.Column("lost_reason", sa.String, nullable=True),
        sa.Column("end_reason", sa.String, nullable=True),
        sa.Column("actor", sa.String, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_index("ix_sessions_status", "sessions", ["status"])

    op.create_table(
        "execs",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("session_id", sa.String, sa.ForeignKey("sessions.id"), nullable=False),
        sa.Column("seq_no", sa.Integer, nullable=False),
        sa.Column("cmd", sa.Text, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("actor", sa.String, nullable=False),
        sa.Column("request_id", sa.String, nullable=True),
        sa.Column("idempotency_key", sa.String, nullable=True),
        sa.Column("timeout_ms", sa.Integer, nullable=False),
        sa.Column("requested_at", sa.String, nullable=False),
        sa.Column("started_at", sa.String, nullable=True),
        sa.Column("finished_at", sa.String, nullable=True),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("cwd", sa.String, nullable=True),
        sa.Column("duration_ms", sa.Float, nullable=True),
        sa.Column("stdout_bytes", sa.Integer, nullable=True),
        sa.Column("stderr_bytes", sa.Integer, nullable=True),
        sa.Column("output_sha256", sa.String, nullable=True),
        sa.Column("truncated", sa.Boolean, nullable=True),
        sa.Column("timed_out", sa.Boolean, nullable=True),
        sa.Column("lost_reason", sa.String, nullable=True),
        sa.UniqueConstraint("session_id", "idempotency_key", name="uq_execs_idempotency_key"),
    )
    op.create_index("ix_execs_session_seq", "execs", ["session_id", "seq_no"])
    op.create_index("ix_execs_status", "execs", ["status"])

    op.create_table(
        "workspaces",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("created_at", sa.String, nullable=False),
        sa.Column("deleted_at", sa.String, nullable=True),
        sa.Column("last_session_id", sa.String, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("workspaces")
    op.drop_index("ix_execs_status", "execs")
    op.drop_index("ix_execs_session_seq", "execs")
    op.drop_table("execs")
    op.drop_index("ix_sessions_status", "sessions")
    op.drop_table("sessions")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS events_no_delete")
        op.execute("DROP TRIGGER IF EXISTS events_no_update")
    op.drop_index("ix_events_type", "events")
    op.drop_table("events")
