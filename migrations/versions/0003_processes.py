"""processes beside the shell: the `processes` read table

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

A new read table, filled by the process.* events (none exist before this revision, so a
replay of an older journal leaves it empty, as this migration does).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "processes",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("session_id", sa.String, sa.ForeignKey("sessions.id"), nullable=False),
        sa.Column("cmd", sa.Text, nullable=False),
        sa.Column("cwd", sa.String, nullable=True),
        sa.Column("env", sa.JSON, nullable=False),
        sa.Column("pty_rows", sa.Integer, nullable=True),
        sa.Column("pty_cols", sa.Integer, nullable=True),
        sa.Column("timeout_ms", sa.Integer, nullable=True),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("actor", sa.String, nullable=False),
        sa.Column("request_id", sa.String, nullable=True),
        sa.Column("idempotency_key", sa.String, nullable=True),
        sa.Column("requested_at", sa.String, nullable=False),
        sa.Column("started_at", sa.String, nullable=True),
        sa.Column("exited_at", sa.String, nullable=True),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("signal", sa.String, nullable=True),
        sa.Column("timed_out", sa.Boolean, nullable=True),
        sa.Column("duration_ms", sa.Float, nullable=True),
        sa.Column("stdout_bytes", sa.Integer, nullable=True),
        sa.Column("stderr_bytes", sa.Integer, nullable=True),
        sa.Column("output_sha256", sa.String, nullable=True),
        sa.Column("dropped_bytes", sa.Integer, nullable=True),
        sa.Column("input_bytes", sa.Integer, nullable=False),
        sa.Column("input_count", sa.Integer, nullable=False),
        sa.Column("lost_reason", sa.String, nullable=True),
        sa.UniqueConstraint("session_id", "idempotency_key", name="uq_processes_idempotency_key"),
    )
    op.create_index("ix_processes_session", "processes", ["session_id", "requested_at"])
    op.create_index("ix_processes_status", "processes", ["status"])


def downgrade() -> None:
    op.drop_index("ix_processes_status", "processes")
    op.drop_index("ix_processes_session", "processes")
    op.drop_table("processes")
