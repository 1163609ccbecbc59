"""Who waits for an exec or a process to end, woken when the journal commits that end.

Who runs this: the daemon's event loop. An output stream follows a log until the journal says
its exec (or process) is settled; instead of asking the journal on a timer, it subscribes here
with the asyncio.Event it sleeps on (the same one inotify sets for new output), and the
journal's commit listener sets it when `exec.finished`/`exec.lost`/`process.exited`/
`process.lost` for that id is committed — by the executor, the reconciler or an HTTP handler
of this daemon. Ends journaled by another process (the CLI) are still found by the stream's
own check of the journal whenever it wakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from sandkasten.domain import events as ev

ENDS = frozenset({ev.EXEC_FINISHED, ev.EXEC_LOST, ev.PROCESS_EXITED, ev.PROCESS_LOST})


class Endings:
    def __init__(self) -> None:
        self.waiting: dict[str, set[asyncio.Event]] = {}
        self.ended: set[str] = set()     # ids ended while somebody was subscribed

    def subscribe(self, key: str, wake: asyncio.Event) -> None:
        self.waiting.setdefault(key, set()).add(wake)

    def unsubscribe(self, key: str, wake: asyncio.Event) -> None:
        waiting = self.waiting.get(key)
        if waiting is not None:
            waiting.discard(wake)
            if not waiting:
                del self.waiting[key]
                self.ended.discard(key)

    def has_ended(self, key: str) -> bool:
        return key in self.ended

    def committed(self, recorded: Iterable[ev.RecordedEvent]) -> None:
        """The journal's commit listener."""
        if not self.waiting:
            return
        for event in recorded:
            if event.type in ENDS:
                key = event.payload.get("exec_id") or event.payload.get("process_id")
                waiting = self.waiting.get(key) if key else None
                if key and waiting:
                    self.ended.add(key)
                    for wake in waiting:
                        wake.set()
