"""Command handling: the one write path — load the stream's state, `decide`, append the events
(store/events.py), project them into the read tables (store/projections.py), all inside one
write transaction that store/connection.py opens and commits.

Who runs what, on which thread:

- `append`, `begin`, `committed` and `in_txn` run on the thread writing the current
  transaction — the event loop or the writer thread (store/connection.py): one transaction at a
  time, so `_txn` (what the open transaction changed, kept apart until COMMIT) has one owner.
- `check_stream`, `plan` and `loaded` (a read folding a stream's events) run on the event loop.
- `StateCache` is shared by both: the loop folds reads into it and plans from it while the
  writer thread reads and updates it, so every access holds its lock. What it hands out is a
  frozen `State`, safe to use after the lock is released.
- `committed` tells `listeners` on the loop's thread, in commit order (`call_soon_threadsafe`
  from the writer thread).

The cache is trusted only for streams in `verified` and for the head (seq, hash): both are
dropped whenever another process (or host) may have appended since this journal's last
transaction (`begin(others_wrote=True)`); the stream is then caught up from the file.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from typing import Any, TypeVar
from collections.abc import Callable, Iterable

import sqlalchemy as sa

from sandkasten.domain import commands as c
from sandkasten.domain import events as ev
from sandkasten.domain import host
from sandkasten.domain.events import RecordedEvent
from sandkasten.domain.session import PriorExecs, State, decide, evolve
from sandkasten.errors import ConcurrencyConflict, InvalidRequest, SandkastenError
from sandkasten.store import events, postgres, projections, statements
from sandkasten.store.schema import execs, processes

T = TypeVar("T")
log = logging.getLogger("sandkasten.journal")
STATE_CACHE_SIZE = 10_000
_PRIOR_EXECS = sa.select(execs.c.id, execs.c.session_id, execs.c.idempotency_key).where(
    (execs.c.id == sa.bindparam("id")) | ((execs.c.session_id == sa.bindparam("sid"))
                                          & (execs.c.idempotency_key == sa.bindparam("key"))))
_PRIOR_PROCESSES = sa.select(processes.c.id, processes.c.session_id, processes.c.idempotency_key).where(
    (processes.c.id == sa.bindparam("id")) | ((processes.c.session_id == sa.bindparam("sid"))
                                              & (processes.c.idempotency_key == sa.bindparam("key"))))
Head = tuple[int, str]   # (seq, hash) of the journal's last event


class StateCache:
    """Streams' folded states (the newest `size`), which of them no other writer can have moved
    on (`verified`), and the journal's head. Shared by the event loop and the writer thread:
    every method holds `_lock`, and each answers from one consistent look."""

    def __init__(self, size: int = STATE_CACHE_SIZE) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._states: OrderedDict[str, State] = OrderedDict()
        self._verified: set[str] = set()    # always a subset of _states' keys
        self._head: Head | None = None

    def get(self, stream_id: str) -> State | None:
        with self._lock:
            return self._states.get(stream_id)

    def trusted(self, stream_id: str) -> tuple[State | None, bool, Head | None]:
        """(cached state, whether it is verified, the head) — one look."""
        with self._lock:
            return self._states.get(stream_id), stream_id in self._verified, self._head

    def remember(self, stream_id: str, state: State) -> None:
        """A state read from the file (not verified: another writer may be ahead)."""
        with self._lock:
            self._put(stream_id, state)

    def commit(self, states: dict[str, State], head: Head | None) -> None:
        """What a transaction of ours committed: its streams' states (verified) and the head."""
        with self._lock:
            for stream_id, state in states.items():
                self._put(stream_id, state)
                self._verified.add(stream_id)
            if head is not None:
                self._head = head

    def forget(self, stream_id: str) -> None:
        with self._lock:
            self._states.pop(stream_id, None)
            self._verified.discard(stream_id)

    def distrust(self) -> None:
        """Another writer may have appended: no stream verified, head unknown."""
        with self._lock:
            self._verified.clear()
            self._head = None

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
            self._verified.clear()
            self._head = None

    def check(self) -> None:
        """Raise AssertionError if the cache broke its own rules (for tests)."""
        with self._lock:
            assert len(self._states) <= self.size, f"{len(self._states)} states kept, at most {self.size}"
            stray = self._verified - self._states.keys()
            assert not stray, f"verified streams with no state: {sorted(stray)[:5]}"

    def _put(self, stream_id: str, state: State) -> None:   # (lock held)
        cached = self._states.get(stream_id)
        if cached is None or cached.version <= state.version:  # a slower reader never rolls it back
            self._states[stream_id] = state
        self._states.move_to_end(stream_id)
        while len(self._states) > self.size:
            self._verified.discard(self._states.popitem(last=False)[0])


class _Txn:
    """What one write transaction changed in memory (streams' states, the head), kept apart
    from the cache until COMMIT: a rollback forgets it."""

    __slots__ = ("states", "head", "recorded")

    def __init__(self) -> None:
        self.states: dict[str, State] = {}
        self.head: Head | None = None
        self.recorded: list[RecordedEvent] = []


class CommandHandler:
    def __init__(self, *, shared: bool, cache: StateCache | None = None) -> None:
        self.cache = cache or StateCache()
        # cluster: (host_id, epoch) of the daemon appending; sandbox observations on sessions
        # placed elsewhere are refused (domain.host.fenced). None on a single host.
        self.fence: tuple[str, int] | None = None
        # called on the event loop with the events of every commit (in order)
        self.listeners: list[Callable[[list[RecordedEvent]], None]] = []
        self._shared = shared        # PostgreSQL: other hosts append too; NOTIFY them of ours
        self._txn: _Txn | None = None   # the writing thread's (see the module doc)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    # --- the edges of a write transaction (connection.Transactions) ---------------------

    def begin(self, others_wrote: bool) -> None:
        """First thing in every write transaction: is what we remember still the truth?"""
        if others_wrote:
            self.cache.distrust()   # catch up per stream
        self._txn = _Txn()

    def committed(self, ok: bool) -> None:
        txn, self._txn = self._txn, None
        if not ok or txn is None:
            if not ok and self._shared:   # (a failed COMMIT's outcome is unknown to us)
                self.cache.clear()
            return
        self.cache.commit(txn.states, txn.head)
        if self.listeners and txn.recorded:   # on the loop's thread, in commit order
            if threading.get_ident() == self._loop_thread:
                self._tell(txn.recorded)
            else:
                self._loop.call_soon_threadsafe(self._tell, txn.recorded)

    def _tell(self, recorded: list[RecordedEvent]) -> None:
        for listener in self.listeners:
            try:
                listener(recorded)
            except Exception:  # a listener must never undo a commit
                log.exception("journal listener failed")

    def in_txn(self, fn: Callable[..., T], conn: Any, *args: Any) -> T:
        """One item of a group commit: on failure its savepoint is rolled back, and so is what
        it changed in the transaction's memory."""
        txn: _Txn = self._txn  # type: ignore[assignment]
        saved = (dict(txn.states), txn.head, len(txn.recorded))
        try:
            return fn(conn, *args)
        except BaseException:
            txn.states, txn.head = saved[0], saved[1]
            del txn.recorded[saved[2]:]
            raise

    # --- the write path -----------------------------------------------------------------

    def append(self, conn: Any, stream_id: str, command: c.Command, actor: str,
               request_id: str | None, at: str | None = None) -> list[RecordedEvent]:
        """Inside the write transaction: load, decide, append, project (stamped now, or `at`)."""
        txn: _Txn = self._txn  # type: ignore[assignment]
        state, seq, prev_hash = self._current(conn, txn, stream_id)
        prior = _prior_execs(conn, stream_id, command)
        refusal = host.fenced(state, command, self.fence)
        if refusal is not None:
            raise host.HostFenced(f"unable to record {type(command).__name__} for {stream_id}: {refusal}",
                                  session_id=stream_id)
        new_events = decide(state, command, prior=prior, stream_id=stream_id)
        try:
            recorded = events.append(conn, (seq, prev_hash), stream_id, state.version if state else 0, new_events,
                                     actor=actor, request_id=request_id, created_at=at or events.now())
        except ConcurrencyConflict:
            self.cache.forget(stream_id)
            raise
        for event in recorded:
            projections.apply(conn, event)
            state = evolve(state, event)
        if state is not None:
            txn.states[stream_id] = state
        txn.head = (recorded[-1].seq, recorded[-1].hash) if recorded else (seq, prev_hash)
        txn.recorded += recorded
        if self._shared and recorded:  # PostgreSQL: wake the other hosts' followers at commit
            postgres.notify(conn, self.fence[0] if self.fence else "", _owner(state))
        return recorded

    def _current(self, conn: Any, txn: _Txn, stream_id: str) -> tuple[State | None, int, str]:
        """The stream's state and the journal's head (seq, hash) inside this transaction: from
        memory when no other writer can have moved them, else caught up from the file."""
        cached, verified, cached_head = self.cache.trusted(stream_id)
        head = txn.head or cached_head
        known = stream_id in txn.states or verified
        base = txn.states.get(stream_id, cached)
        if known and head is not None:
            return base, head[0], head[1]
        stmt = events.STREAM_TAIL_AND_HEAD if head is None else events.STREAM_TAIL
        rows = statements.execute(conn, stmt, {"sid": stream_id, "v": base.version if base else 0})
        state, seq, prev_hash = fold(stream_id, base, rows)
        if state is not None:
            txn.states[stream_id] = state
        return (state, seq, prev_hash) if head is None else (state, head[0], head[1])

    def plan(self, stream_id: str, commands: list[c.Command]) -> list[ev.NewEvent] | None:
        """(On the loop.) The events `commands` will append to `stream_id` — only when its state
        is known to be current and `decide` accepts every one of them; else None."""
        state, verified, _ = self.cache.trusted(stream_id)
        if not verified:
            return None
        planned: list[ev.NewEvent] = []
        try:
            for command in commands:
                check_stream(stream_id, command)
                new = decide(state, command, stream_id=stream_id)
                for event in new:
                    state = evolve(state, event)
                planned += new
        except SandkastenError:
            return None
        return planned

    # --- loading a state for a read -----------------------------------------------------

    def catch_up(self, stream_id: str) -> tuple[sa.ClauseElement, dict[str, Any], State | None]:
        """The query for the stream's events newer than its cached state, and that state (the
        base to fold them onto, whatever a writer does to the cache meanwhile)."""
        base = self.cache.get(stream_id)
        return events.STREAM_TAIL, {"sid": stream_id, "v": base.version if base else 0}, base

    def loaded(self, stream_id: str, base: State | None, rows: Iterable[Any]) -> State | None:
        state = fold(stream_id, base, rows)[0]
        if state is not None:
            self.cache.remember(stream_id, state)
        return state


def fold(stream_id: str, base: State | None, rows: Iterable[Any]) -> tuple[State | None, int, str]:
    """`base` evolved by the stream's rows; (state, seq, hash) of the newest row seen."""
    state = base
    seq, prev_hash, seen = 0, events.GENESIS_HASH, set()
    for row in rows:
        seq, prev_hash = max((seq, prev_hash), (row.seq, row.hash))
        mine = row.stream_id == stream_id and row.seq not in seen
        if mine and (state is None or row.stream_version > state.version):
            seen.add(row.seq)
            state = evolve(state, events.recorded(row))
    return state, seq, prev_hash


def _prior_execs(conn: Any, stream_id: str, command: c.Command) -> PriorExecs | None:
    """Facts about earlier execs that the state does not keep (see domain.session)."""
    if isinstance(command, c.RequestExec):
        own_id, query = command.exec_id, _PRIOR_EXECS
    elif isinstance(command, c.RequestProcess):
        own_id, query = command.process_id, _PRIOR_PROCESSES
    else:
        return None
    rows = statements.execute(conn, query, {"id": own_id, "sid": stream_id, "key": command.idempotency_key})
    taken = any(row.id == own_id for row in rows)
    owner = next((row.id for row in rows if row.session_id == stream_id
                  and row.idempotency_key is not None and row.idempotency_key == command.idempotency_key), None)
    return PriorExecs(exec_id_taken=taken, key_exec_id=owner)


def _owner(state: State | None) -> str:
    """Whose executor a change of this stream may concern (the NOTIFY payload, see postgres.notify)."""
    if state is None or not hasattr(state, "session_id"):
        return "-"
    return getattr(state, "host_id", None) or ""


def check_stream(stream_id: str, command: c.Command) -> None:
    if isinstance(command, c.RequestSession) and command.session_id != stream_id:
        raise InvalidRequest(f"unable to request session {command.session_id}: stream id is {stream_id}")
    if isinstance(command, host.HOST_COMMANDS) != stream_id.startswith(host.HOST_STREAM_PREFIX):
        raise InvalidRequest(f"unable to apply {type(command).__name__} to stream {stream_id}: host commands "
                             f"go to {host.HOST_STREAM_PREFIX}<host_id> streams, and only they")
    if isinstance(command, (c.CreateWorkspace, c.DeleteWorkspace)):
        wanted = ev.workspace_stream(command.workspace_id)
        if stream_id != wanted:
            raise InvalidRequest(f"unable to change workspace {command.workspace_id}: stream must be {wanted}")
