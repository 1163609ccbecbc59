"""Alembic's migrations and schema.py describe the same database."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from sandkasten.store import schema


def master(path) -> set[tuple[str, str, str, str]]:
    with sqlite3.connect(path) as raw:
        rows = raw.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master "
            "WHERE name NOT LIKE 'alembic_version%' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
    return {(t, n, tbl, re.sub(r"\s+", " ", sql or "").strip()) for t, n, tbl, sql in rows}


def create_all(path) -> None:
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        schema.metadata.create_all(engine)
    finally:
        engine.dispose()


def test_migrated_database_equals_create_all(tmp_path):
    schema.upgrade(tmp_path / "migrated.db", busy_timeout_s=5)
    create_all(tmp_path / "models.db")
    migrated = master(tmp_path / "migrated.db")
    assert migrated == master(tmp_path / "models.db")
    names = {name for _, name, _, _ in migrated}
    assert {"events", "sessions", "execs", "workspaces", "events_no_update", "events_no_delete"} <= names


def test_autogenerate_finds_no_difference(tmp_path):
    path = tmp_path / "migrated.db"
    schema.upgrade(path, busy_timeout_s=5)
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), schema.metadata) == []
    finally:
        engine.dispose()


def test_single_head_and_migrations_dir_found_from_the_package():
    cfg = schema.alembic_config("sqlite://")
    assert schema.migrations_dir().joinpath("env.py").is_file()
    assert ScriptDirectory.from_config(cfg).get_heads() == [schema.HEAD_REVISION]


def test_upgrade_is_repeatable_and_downgrade_removes_everything(tmp_path):
    path = tmp_path / "j.db"
    schema.upgrade(path, busy_timeout_s=5)
    schema.upgrade(path, busy_timeout_s=5)
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            cfg = schema.alembic_config(f"sqlite:///{path}")
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
    finally:
        engine.dispose()
    assert master(path) == set()


MIGRATE = "import sys; from pathlib import Path; from sandkasten.store import schema; schema.upgrade(Path(sys.argv[1]), 30)"


def test_two_processes_migrating_a_fresh_file_take_turns(tmp_path):
    path = tmp_path / "fresh.db"
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, str(path)], stderr=subprocess.PIPE) for _ in range(3)]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    create_all(tmp_path / "models.db")
    assert master(path) == master(tmp_path / "models.db")


def test_head_revision_constant_matches_alembic():
    from alembic.script import ScriptDirectory

    from sandkasten.store import schema

    script = ScriptDirectory.from_config(schema.alembic_config("sqlite://"))
    assert script.get_current_head() == schema.HEAD_REVISION


def test_0002_adds_the_pool_column_and_keeps_existing_rows(tmp_path):
    path = tmp_path / "old.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            cfg = schema.alembic_config(f"sqlite:///{path}")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
            conn.exec_driver_sql(
                "INSERT INTO sessions (id, status, image, cpu_limit, mem_limit_mb, pids_limit, network_mode, env, "
                "ttl_seconds, readonly_rootfs, created_at, updated_at, expires_at, pooled, cwd, exec_count, "
                "last_activity_at, actor, version) VALUES ('s-old', 'running', 'base', 1, 512, 256, 'none', '{}', "
                "60, 0, 't', 't', 't', 0, '/workspace', 0, 't', 'api', 2)")
    finally:
        engine.dispose()
    schema.upgrade(path, busy_timeout_s=5)
    assert schema.current_revision(path) == schema.HEAD_REVISION
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT id, pool FROM sessions").fetchall() == [("s-old", None)]
