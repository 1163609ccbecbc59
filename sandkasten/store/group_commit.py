"""Group commit on the journal's SQLite connection: appends that arrive together share one
transaction (one BEGIN IMMEDIATE, one COMMIT), each inside its own SAVEPOINT, in arrival order
— so the hash chain stays one line and a refused append takes only itself back.

Who runs this: the journal, on the daemon's (or the CLI's) event loop. `submit(work)` queues a
function `work(conn)` and returns a future; the queue is written at the next turn of the loop,
so everything handlers submitted in between is one batch. Where the batch runs:

- **on the event loop**, when `durability` is normal and the write lock is free at once: a
  commit without fsync is ~10 µs of SQLite, far less than a hop to a thread and back. An
  append with no other one in the last ALONE_S is written at once, inside `submit`; under
  load appends gather for one turn of the loop and share a transaction;
- **on the writer thread**, when a commit must fsync (`durability: full`), when another
  process holds the write lock (the thread waits on `busy_timeout`; the loop never does), or
  when a batch is large (the reconciler adopting every session after a restart). While a batch
  is in the thread, new appends queue up and become the next batch.

`begin(conn)` runs after BEGIN IMMEDIATE and before the batch (the journal checks there whether
another process wrote since its last transaction); `committed(ok)` after COMMIT or ROLLBACK, on
the thread that ran the batch. Checkpoints never run on the commit path: the connection's
auto-checkpoint is off and `checkpoint()` copies the WAL back on another thread every
CHECKPOINT_EVERY commits.

Threads: the queue, `scheduled`, `in_thread` and the futures are the event loop's alone. The
connection and the counters (`commits`, `items`, `_since_checkpoint`) belong to whoever writes
the current batch — the loop, or the writer thread while `in_thread` is set, during which the
loop starts no batch of its own and reads none of them; it takes them back in `_thread_done`,
after the thread's future is done.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from collections.abc import Callable

INLINE_MAX = 16              # a batch with more items than this is written on the thread
CHECKPOINT_EVERY = 256       # commits between two passive checkpoints
DEFER_S = 0.002              # a deferred item is written at the latest this long after its submit
ALONE_S = 0.0005             # no other append for this long: write at once instead of gathering a batch


class _Item:
    __slots__ = ("work", "future", "heavy")

    def __init__(self, work: Callable[[sqlite3.Connection], Any], future: asyncio.Future, heavy: bool) -> None:
        self.work, self.future, self.heavy = work, future, heavy


class GroupCommit:
    def __init__(self, conn: sqlite3.Connection, *, inline: bool, busy_timeout_s: float,
                 begin: Callable[[sqlite3.Connection], None], committed: Callable[[bool], None],
                 checkpoint: Callable[[], None]) -> None:
        self.conn = conn
        self.inline = inline
        self.busy_ms = int(busy_timeout_s * 1000)
        self._begin, self._committed, self._checkpoint = begin, committed, checkpoint
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")
        self.queue: list[_Item] = []
        self.scheduled = False
        self.in_thread = False          # a batch is being written on the thread
        self._last_submit = 0.0
        self.commits = 0                # (for tests and the bench: how appends were grouped)
        self.items = 0
        self._since_checkpoint = 0
        conn.execute("PRAGMA busy_timeout = 0")   # the loop never waits for the lock

    # ------------------------------------------------------------------ the loop's side
    def submit(self, work: Callable[[sqlite3.Connection], Any], heavy: bool = False,
               defer: bool = False) -> asyncio.Future:
        """Queue `work`; written at the next turn of the loop — or, `defer`red, when somebody
        calls `flush` (an HTTP handler, once its answer is out) or DEFER_S later."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        now = loop.time()
        alone, self._last_submit = now - self._last_submit > ALONE_S, now
        self.queue.append(_Item(work, future, heavy))
        if defer:
            loop.call_later(DEFER_S, self.flush)
        elif alone and len(self.queue) == 1 and not self.in_thread and self.inline and not heavy:
            self._flush()   # nobody else is appending: write it now, without a turn of the loop
        elif not self.scheduled and not self.in_thread:
            self.scheduled = True
            loop.call_soon(self._flush)
        return future

    def idle(self) -> bool:
        """Nothing queued, nothing being written: an item submitted now is written first."""
        return not self.queue and not self.in_thread

    def flush(self) -> None:
        """Write what is queued now (unless a batch is on the thread: it follows that one)."""
        if self.queue and not self.in_thread:
            self._flush()

    def _flush(self) -> None:
        self.scheduled = False
        if self.in_thread or not self.queue:
            return
        batch, self.queue = self.queue, []
        if self.inline and len(batch) <= INLINE_MAX and not any(item.heavy for item in batch):
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    self._settle_all(batch, exc)
                    return
            else:  # the lock is ours: write here and now
                self._settle(self._write(batch))
                return
        self._to_thread(batch)

    def _to_thread(self, batch: list[_Item]) -> None:
        self.in_thread = True
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self.thread, self._write_waiting, batch)
        job.add_done_callback(lambda done: self._thread_done(loop, done))

    def _thread_done(self, loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        self.in_thread = False
        self._settle(done.result())
        if self.queue and not self.scheduled:
            self.scheduled = True
            loop.call_soon(self._flush)

    def _settle(self, outcomes: list[tuple[_Item, bool, Any]]) -> None:
        for item, ok, value in outcomes:
            if item.future.done():     # its caller was cancelled: the append happened anyway
                continue
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(value)
        if self._since_checkpoint >= CHECKPOINT_EVERY:
            self._since_checkpoint = 0
            self._checkpoint()

    @staticmethod
    def _settle_all(batch: list[_Item], exc: BaseException) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(exc)

    async def drain(self) -> None:
        """Wait until everything submitted so far is written (on close)."""
        # the writer thread's state, no event to await; polled on close only
        while self.queue or self.in_thread or self.scheduled:  # noqa: ASYNC110
            await asyncio.sleep(0.001)

    def close(self) -> None:
        self.thread.shutdown(wait=True)
        self.conn.close()

    # ------------------------------------------------------------------ writing a batch
    def _write_waiting(self, batch: list[_Item]) -> list[tuple[_Item, bool, Any]]:
        """On the writer thread: wait for the write lock (busy_timeout), then write."""
        try:
            self.conn.execute(f"PRAGMA busy_timeout = {self.busy_ms}")
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            finally:
                self.conn.execute("PRAGMA busy_timeout = 0")
        except sqlite3.Error as exc:
            return [(item, False, exc) for item in batch]
        return self._write(batch)

    def _write(self, batch: list[_Item]) -> list[tuple[_Item, bool, Any]]:
        """Inside BEGIN IMMEDIATE: each item in its own savepoint (when there are several),
        then one COMMIT. A refused item (a SandkastenError) is rolled back alone; a database
        error ends the whole batch."""
        conn = self.conn
        outcomes: list[tuple[_Item, bool, Any]] = []
        several = len(batch) > 1
        try:
            self._begin(conn)
            for item in batch:
                if several:
                    conn.execute("SAVEPOINT item")
                try:
                    value = item.work(conn)
                except Exception as refused:  # refused (decide) or failed: this item alone
                    if isinstance(refused, sqlite3.Error):
                        raise
                    if several:
                        conn.execute("ROLLBACK TO item")
                        conn.execute("RELEASE item")
                    else:
                        conn.execute("ROLLBACK")
                        self._committed(False)
                        return [(item, False, refused)]
                    outcomes.append((item, False, refused))
                    continue
                if several:
                    conn.execute("RELEASE item")
                outcomes.append((item, True, value))
            conn.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - a database error: nothing of the batch stays
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            self._committed(False)
            return [(item, False, exc) for item in batch]
        self.commits += 1
        self.items += len(batch)
        self._since_checkpoint += 1
        self._committed(True)
        return outcomes
