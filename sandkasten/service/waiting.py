"""How a caller waits for the work its intent asked for: the one thing the API and the CLI do
differently (DESIGN.md §2: the journal is the one write path; the executor acts on it).

- `Settling`: inside the daemon, await the executor's keyed task for that work (started here if
  nobody has started it yet), without owning it: a client that goes away cancels only its own
  wait, never the work; a stop of the daemon answers 503 NOT_READY saying what happens next.
- `Polling`: outside the daemon (the CLI), read the journal until the daemon has done the work,
  as long as a daemon runs; with none, return at once: the intent stays queued in the journal.

Both return when the work settled (or when there is nobody to wait for); what happened is read
from the journal, except for an exec the daemon ran for this very caller (`Observed`: its end,
journaled right after the caller answers — the exec hot path reads nothing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol

from sandkasten.control.executor import Executor, Observed
from sandkasten.errors import NotReady
from sandkasten.runtime.spec import ExecRequest
from sandkasten.schema.vocabulary import EXEC_ENDED, SESSION_ENDED, SessionStatus
from sandkasten.store.journal import Journal



class Waiter(Protocol):
    async def created(self, sid: str, fresh: bool = False) -> None:
        """Until session `sid` runs, or failed to start (`fresh`: the caller just journaled its
        request under a new id)."""

    async def executed(self, sid: str, exec_id: str, req: ExecRequest | None = None,
                       answering: bool = False) -> Observed | None:
        """Until exec `exec_id` finished or was lost; its end when this waiter ran it (`req`: its
        request was just journaled; `answering`: the end may be journaled after the answer)."""

    def begin_exec(self, sid: str, exec_id: str, req: ExecRequest | None = None) -> None:
        """Have exec `exec_id` run without waiting for it (its output is followed elsewhere)."""

    async def destroyed(self, sid: str, then: str = "") -> None:
        """Until session `sid` is destroyed (`then`: what the client does after a daemon stop)."""

    async def workspace_removed(self, wid: str) -> None:
        """Until the directory of deleted workspace `wid` is gone."""


async def settle(stopping: Callable[[], bool], task: asyncio.Future, on_stop: str) -> Any:
    """Await an executor task without owning it: a client that goes away cancels only its
    handler, never the work. A stop of the daemon cancels the task (the sandbox and its command
    carry on; the next daemon finishes the job from the journal): a 503 saying `on_stop`."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if stopping() and not (current is not None and current.cancelling()):
            raise NotReady(f"the daemon is stopping: {on_stop}") from None
        raise


class Settling:
    """Inside the daemon: the executor's keyed tasks."""

    def __init__(self, executor: Executor, stopping: Callable[[], bool]):
        self.executor = executor
        self.stopping = stopping

    async def created(self, sid: str, fresh: bool = False) -> None:
        await settle(self.stopping, self.executor.ensure_session(sid, fresh),
                     f"session {sid} is created once the daemon is back (GET /v1/sessions/{sid})")

    async def executed(self, sid: str, exec_id: str, req: ExecRequest | None = None,
                       answering: bool = False) -> Observed | None:
        return await settle(self.stopping, self.executor.ensure_exec(sid, exec_id, req, answering),
                            f"exec {exec_id} runs on in its sandbox; repeat the request with the same "
                            f"Idempotency-Key or GET /v1/sessions/{sid}/execs/{exec_id} for its result once "
                            "the daemon is back")

    def begin_exec(self, sid: str, exec_id: str, req: ExecRequest | None = None) -> None:
        self.executor.ensure_exec(sid, exec_id, req)   # not awaited: the command outlives the caller

    async def destroyed(self, sid: str, then: str = "") -> None:
        await settle(self.stopping, self.executor.ensure_destroyed(sid),
                     f"session {sid} is destroyed once the daemon is back{then}")

    async def workspace_removed(self, wid: str) -> None:
        await settle(self.stopping, self.executor.ensure_workspace_removed(wid),
                     f"the directory of workspace {wid} is removed once the daemon is back")


class Polling:
    """Outside the daemon (the CLI): poll the journal while `alive()` (a daemon runs, or the
    session's host in a cluster), for at most `wait_s` for a session; an exec is waited for as
    long as somebody runs it."""

    def __init__(self, journal: Journal, alive: Callable[[], bool], wait_s: float = 30.0):
        self.journal = journal
        self.alive = alive
        self.wait_s = wait_s

    async def _session(self, sid: str, statuses: Collection[str]) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            row = await self.journal.session(sid)
            if row is None or row["status"] in statuses or time.monotonic() > deadline or not self.alive():
                return
            await asyncio.sleep(0.1)

    async def created(self, sid: str, fresh: bool = False) -> None:
        await self._session(sid, (SessionStatus.RUNNING, *SESSION_ENDED))

    async def executed(self, sid: str, exec_id: str, req: ExecRequest | None = None,
                       answering: bool = False) -> Observed | None:
        if not self.alive():
            return None
        checked = time.monotonic()
        while True:
            row = await self.journal.exec(exec_id)
            if row is None or row["status"] in EXEC_ENDED:
                return None
            if time.monotonic() - checked > 1.0:   # gives up only if the daemon goes away
                checked = time.monotonic()
                if not self.alive():
                    return None
            await asyncio.sleep(0.05)

    def begin_exec(self, sid: str, exec_id: str, req: ExecRequest | None = None) -> None:
        return None   # the daemon follows the journal and runs it

    async def destroyed(self, sid: str, then: str = "") -> None:
        await self._session(sid, SESSION_ENDED)

    async def workspace_removed(self, wid: str) -> None:
        return None   # the daemon removes it (at the latest when it starts: its reconcile)
