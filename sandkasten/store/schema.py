"""The journal's tables as SQLAlchemy Core metadata.

`events` is the truth and append-only (triggers refuse UPDATE and DELETE). `sessions`,
`execs` and `workspaces` are read tables: caches kept in step with `events` in the same
transaction and rebuildable by replay. Alembic owns the schema on disk
(migrations/versions/0001_initial.py and the later ones create exactly these); `metadata.create_all` is
used only by the test that proves the two agree.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    import alembic.config

metadata = sa.MetaData()

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("stream_id", sa.String, nullable=False),
    sa.Column("stream_version", sa.Integer, nullable=False),
    sa.Column("type", sa.String, nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # canonical JSON, exactly what was hashed
    sa.Column("actor", sa.String, nullable=False),
    sa.Column("request_id", sa.String, nullable=True),
    sa.Column("created_at", sa.String, nullable=False),  # ISO 8601 UTC, microseconds
    sa.Column("prev_hash", sa.String, nullable=False),
    sa.Column("hash", sa.String, nullable=False),
    sa.UniqueConstraint("stream_id", "stream_version", name="uq_events_stream_version"),
    sqlite_autoincrement=True,
)
sa.Index("ix_events_type", events.c.type)

sessions = sa.Table(
    "sessions",
    metadata,
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
    # pool members: "idle" | "claiming" | "claimed"; NULL for ordinary sessions (migration 0002)
    sa.Column("pool", sa.String, nullable=True),
    # the host a session is placed on and that host's epoch (cluster; NULL on one host) (0004)
    sa.Column("host_id", sa.String, nullable=True),
    sa.Column("host_epoch", sa.Integer, nullable=True),
)
sa.Index("ix_sessions_status", sessions.c.status)
sa.Index("ix_sessions_host", sessions.c.host_id)

execs = sa.Table(
    "execs",
    metadata,
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
    # NULL keys are distinct in UNIQUE on SQLite and PostgreSQL: only real keys collide
    sa.UniqueConstraint("session_id", "idempotency_key", name="uq_execs_idempotency_key"),
)
sa.Index("ix_execs_session_seq", execs.c.session_id, execs.c.seq_no)
sa.Index("ix_execs_status", execs.c.status)

workspaces = sa.Table(
    "workspaces",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("created_at", sa.String, nullable=False),
    sa.Column("deleted_at", sa.String, nullable=True),
    sa.Column("last_session_id", sa.String, nullable=True),
)

processes = sa.Table(
    "processes",
    metadata,
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
sa.Index("ix_processes_session", processes.c.session_id, processes.c.requested_at)
sa.Index("ix_processes_status", processes.c.status)


# the daemons sharing the journal: read table of the `host:<id>` streams (migration 0004)
hosts = sa.Table(
    "hosts",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("status", sa.String, nullable=False),  # "live" | "lost"
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("address", sa.String, nullable=False),  # http://host:port other nodes forward to
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

READ_TABLES = (processes, execs, sessions, workspaces, hosts)  # delete order (processes, execs reference sessions)

# The append-only guarantee lives in the database, so no writer (ours or a stray sqlite3
# shell) can rewrite history without first dropping these triggers.
APPEND_ONLY_TRIGGERS = (
    "CREATE TRIGGER events_no_update BEFORE UPDATE ON events "
    "BEGIN SELECT RAISE(ABORT, 'events are append-only'); END",
    "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
    "BEGIN SELECT RAISE(ABORT, 'events are append-only'); END",
)

for _ddl in APPEND_ONLY_TRIGGERS:
    sa.event.listen(events, "after_create", sa.DDL(_ddl).execute_if(dialect="sqlite"))

PG_APPEND_ONLY = (
    "CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'events are append-only'; END $$",
    "CREATE TRIGGER events_no_update BEFORE UPDATE ON events FOR EACH ROW EXECUTE FUNCTION events_append_only()",
    "CREATE TRIGGER events_no_delete BEFORE DELETE ON events FOR EACH ROW EXECUTE FUNCTION events_append_only()",
)
for _ddl in PG_APPEND_ONLY:
    sa.event.listen(events, "after_create", sa.DDL(_ddl).execute_if(dialect="postgresql"))


# --- bringing a database file to the schema (Alembic) --------------------------------------

_upgrade_lock = threading.Lock()  # alembic's `context` proxy is process-global


def migrations_dir() -> Path:
    """The `migrations/` directory next to the package (a source or editable install)."""
    override = os.environ.get("SANDKASTEN_MIGRATIONS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent.parent / "migrations"


def alembic_config(url: str) -> alembic.config.Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


# The newest migration's revision id; tests/test_migrations.py checks it equals alembic's head.
HEAD_REVISION = "0004"


def current_revision(db_path: Path) -> str | None:
    """The schema revision recorded in the file, read with plain sqlite3 (fast)."""
    import sqlite3

    if not Path(db_path).exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        try:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def upgrade(db_path: Path, busy_timeout_s: float) -> None:
    """Run `alembic upgrade head` on `db_path` (blocking: call it from a thread).

    Processes migrating the same file at once (a daemon and a CLI on a fresh data dir) take
    turns on an flock of `<db>.migrate.lock` and re-read the revision once they hold it:
    alembic commits between revisions on SQLite (no transactional DDL), so a database lock
    alone would let a second process replay a revision the first one just applied.
    """
    if current_revision(db_path) == HEAD_REVISION:
        return  # the common case (every CLI call): no need to load alembic at all
    import fcntl

    lock_path = Path(db_path).with_name(Path(db_path).name + ".migrate.lock")
    with _upgrade_lock, open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if current_revision(db_path) != HEAD_REVISION:
            _run_alembic_upgrade(db_path, busy_timeout_s)


def _run_alembic_upgrade(db_path: Path, busy_timeout_s: float) -> None:
    from alembic import command

    engine = sa.create_engine(f"sqlite:///{db_path}", poolclass=sa.pool.NullPool)

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see below)
        dbapi_conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        dbapi_conn.execute("PRAGMA journal_mode = WAL")

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    cfg = alembic_config(f"sqlite:///{db_path}")
    try:
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
    finally:
        engine.dispose()
