"""The event store: append events to the one hash chain, read them back, verify the chain.

Who uses this: the command handler (store/commands.py) appends inside its write transaction;
the reads (store/reads.py), `Journal.verify` and the projections' replay read. Every function
takes the connection it runs on (store/connection.py says whose it is) and keeps no state of
its own: the statements below are built once, at import, and never change.

Every event carries a global `seq`, its stream and version, type and schema version, actor,
request id, a UTC timestamp and `hash = sha256(prev_hash + canonical JSON of those fields and
the payload)`; the first event chains to GENESIS_HASH. `UNIQUE(stream_id, stream_version)`
turns a lost race between two writers into `ConcurrencyConflict` (the caller retries).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, UTC
from typing import Any
from collections.abc import Iterable, Iterator

import sqlalchemy as sa
from json.encoder import encode_basestring as _encode_string   # = json.dumps(str, ensure_ascii=False)

from sandkasten.domain import events as ev
from sandkasten.domain.events import RecordedEvent
from sandkasten.errors import ConcurrencyConflict
from sandkasten.store import statements
from sandkasten.store.schema import events

GENESIS_HASH = "0" * 64
PAGE = 2_000
# Statements on the append path are built once and run with bound parameters: building
# a SQLAlchemy statement costs several times more than executing it.
INSERT = sa.insert(events)
_STREAM_TAIL = sa.select(events).where(events.c.stream_id == sa.bindparam("sid"),
                                       events.c.stream_version > sa.bindparam("v"))
STREAM_TAIL = _STREAM_TAIL.order_by(events.c.seq)
# a stream's tail and, in the same query, the journal's last event (the head the next append chains to)
STREAM_TAIL_AND_HEAD = sa.union_all(
    _STREAM_TAIL, sa.select(sa.select(events).order_by(events.c.seq.desc()).limit(1).subquery())
).order_by(sa.column("seq"))
LAST_SEQ = sa.select(sa.func.max(events.c.seq))
_PAGE_AFTER = sa.select(events).where(events.c.seq > sa.bindparam("after")).order_by(events.c.seq).limit(PAGE)
# `read`'s statements, one per (by stream?, types): the callers' type sets are a few constants
_READS: dict[tuple[bool, tuple[str, ...] | None], sa.Select] = {}
_READS_MAX = 64
_building = threading.Lock()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None
    reason: str


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# an event's identifying fields, hashed into the chain with its payload
_HASHED_FIELDS = ("seq", "stream_id", "stream_version", "type", "schema_version", "actor", "request_id", "created_at")


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """sha256(prev_hash + canonical JSON of the event's identifying fields)."""
    body = {k: row[k] for k in _HASHED_FIELDS}
    body["payload"] = row["payload"]
    return hashlib.sha256((prev_hash + canonical_json(body)).encode()).hexdigest()


def _chain_hash_of(prev_hash: str, row: dict[str, Any], payload_json: str) -> str:
    """`chain_hash` with the payload already in canonical JSON (the append writes that very
    text): the same bytes — keys in sorted order, strings as `json.dumps(ensure_ascii=False)`
    writes them — with one serialisation instead of two."""
    text = _json_text
    body = (f'{{"actor":{text(row["actor"])},"created_at":{text(row["created_at"])},"payload":{payload_json},'
            f'"request_id":{text(row["request_id"])},"schema_version":{int(row["schema_version"])},'
            f'"seq":{int(row["seq"])},"stream_id":{text(row["stream_id"])},'
            f'"stream_version":{int(row["stream_version"])},"type":{text(row["type"])}}}')
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def _json_text(value: str | None) -> str:
    return "null" if value is None else _encode_string(value)


def now() -> str:
    """The journal's timestamps: ISO 8601 UTC, microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def recorded(row: Any) -> RecordedEvent:
    """An `events` row as the event it records (old payloads upcast)."""
    version, payload = ev.upcast(row.type, row.schema_version, json.loads(row.payload))
    return RecordedEvent(
        seq=row.seq, stream_id=row.stream_id, stream_version=row.stream_version, type=row.type,
        schema_version=version, payload=payload, actor=row.actor, request_id=row.request_id,
        created_at=row.created_at, hash=row.hash,
    )


# --- append ---------------------------------------------------------------------------------

def append(conn: Any, head: tuple[int, str], stream_id: str, version: int, new_events: Iterable[ev.NewEvent], *,
           actor: str, request_id: str | None, created_at: str) -> list[RecordedEvent]:
    """Inside a write transaction: `new_events` after the stream's `version`, chained to the
    journal's `head` (seq, hash). Raises ConcurrencyConflict when the stream moved on."""
    seq, prev_hash = head
    out = []
    for new in new_events:
        seq, version = seq + 1, version + 1
        payload = dict(new.payload)
        payload_json = canonical_json(payload)
        row: dict[str, Any] = {"seq": seq, "stream_id": stream_id, "stream_version": version, "type": new.type,
                               "schema_version": new.schema_version, "payload": payload, "actor": actor,
                               "request_id": request_id, "created_at": created_at}
        row_hash = _chain_hash_of(prev_hash, row, payload_json)
        _insert(conn, {**row, "payload": payload_json, "prev_hash": prev_hash, "hash": row_hash})
        prev_hash = row_hash
        out.append(RecordedEvent(hash=row_hash, **row))
    return out


def _insert(conn: Any, row: dict[str, Any]) -> None:
    try:
        statements.execute(conn, INSERT, row)
    except (sa.exc.IntegrityError, sqlite3.IntegrityError) as exc:
        if "events" not in str(getattr(exc, "orig", exc)):
            raise
        raise ConcurrencyConflict(
            f"unable to append to stream {row['stream_id']}: version {row['stream_version']} already exists"
        ) from exc


# --- read -----------------------------------------------------------------------------------

def read(conn: Any, after_seq: int, stream_id: str | None, limit: int, types: Iterable[str] | None
         ) -> list[RecordedEvent]:
    """Events after `after_seq`, in order, at most `limit`; of one stream and of some types, if given."""
    key = (stream_id is not None, tuple(sorted(set(types))) if types is not None else None)
    params = {"after": after_seq, "sid": stream_id, "limit": limit}
    stmt = _READS.get(key)
    if stmt is None:
        stmt = _read_statement(*key)
        with _building:
            kept = len(_READS) < _READS_MAX   # else not a known caller's: run this once, not kept
            if kept:
                stmt = _READS.setdefault(key, stmt)
        if not kept:
            return [recorded(row) for row in statements.execute_once(conn, stmt, params)]
    return [recorded(row) for row in statements.execute(conn, stmt, params)]


def _read_statement(by_stream: bool, types: tuple[str, ...] | None) -> sa.Select:
    query = sa.select(events).where(events.c.seq > sa.bindparam("after"))
    if by_stream:
        query = query.where(events.c.stream_id == sa.bindparam("sid"))
    if types is not None:   # (no IN (…) beside bound parameters: statements renders constant lists at compile time)
        query = query.where(sa.or_(sa.false(), *(events.c.type == t for t in types)))
    return query.order_by(events.c.seq).limit(sa.bindparam("limit", type_=sa.Integer))


def pages(conn: Any) -> Iterator[list[Any]]:
    """Every `events` row in order, PAGE rows at a time."""
    after = 0
    while rows := statements.execute(conn, _PAGE_AFTER, {"after": after}):
        yield rows
        after = rows[-1].seq


# --- verify ---------------------------------------------------------------------------------

def verify(conn: Any) -> VerifyResult:
    """Recompute the hash chain from the first event; name the first row that disagrees."""
    prev_hash, checked = GENESIS_HASH, 0
    for rows in pages(conn):
        for row in rows:
            reason = _check_row(row, prev_hash)
            if reason:
                return VerifyResult(False, checked, row.seq, f"event {row.seq}: {reason}")
            prev_hash, checked = row.hash, checked + 1
    return VerifyResult(True, checked, None, f"{checked} events, chain intact")


def _check_row(row: Any, prev_hash: str) -> str | None:
    if row.prev_hash != prev_hash:
        return "prev_hash does not match the previous event's hash (an event was removed or reordered)"
    try:
        payload = json.loads(row.payload)
    except ValueError:
        return "payload is not valid JSON"
    if canonical_json(payload) != row.payload:
        return "payload is not in canonical form (edited by hand)"
    fields = {k: getattr(row, k) for k in _HASHED_FIELDS}
    if chain_hash(prev_hash, {**fields, "payload": payload}) != row.hash:
        return "hash does not match the event's content (the row was changed)"
    return None
