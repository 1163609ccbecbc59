"""The journal on disk: SQLite (WAL) through SQLAlchemy async, schema by Alembic."""

from sandkasten.store.journal import Journal, RecordedEvent, VerifyResult

__all__ = ["Journal", "RecordedEvent", "VerifyResult"]
