"""The journal on disk: SQLite (WAL; SQLAlchemy Core statements run on the sqlite3 driver,
group commit) or PostgreSQL for a cluster; schema by Alembic."""

from sandkasten.store.journal import Journal, RecordedEvent, VerifyResult

__all__ = ["Journal", "RecordedEvent", "VerifyResult"]
