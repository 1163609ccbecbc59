"""File writes and deletes through the file API, journaled: `file.written` {path, size, sha256}
(never the content) and `file.deleted` {path, recursive}, on the session's stream or the
workspace's, so `sandkasten audit export`, `logs` and the console show who changed what.

Who runs this: the HTTP handlers of a session's files and of a workspace's. The change is made
first and journaled after it (the event records a fact); a session that ended in between is
logged, not failed: the change happened. Paths are confined by `WorkspaceFS` (RESOLVE_BENEATH).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from sandkasten.domain import commands as c
from sandkasten.errors import IllegalTransition
from sandkasten.files.workspace_fs import Entry, WorkspaceFS
from sandkasten.service.sessions import Caller
from sandkasten.store.journal import Journal

log = logging.getLogger("sandkasten.service.files")


def shown_path(relative: str) -> str:
    """A path below the workspace as clients see it: /workspace/..."""
    return "/workspace/" + relative if relative else "/workspace"


class Files:
    def __init__(self, journal: Journal):
        self.journal = journal

    async def write(self, stream: str, fs: WorkspaceFS, writes: list[tuple[str, bytes]], caller: Caller) -> list[Entry]:
        """Write each (path, content), in order, then journal them in one commit."""
        done = [(await asyncio.to_thread(fs.write, path, data), data) for path, data in writes]
        await self.record(stream, [written(entry, data) for entry, data in done], caller)
        return [entry for entry, _ in done]

    async def delete(self, stream: str, fs: WorkspaceFS, path: str, recursive: bool, caller: Caller) -> None:
        await asyncio.to_thread(fs.delete, path, recursive)
        await self.record(stream, [c.RecordFileChange(path=shown_path(fs.normalize(path, "delete")), op="delete",
                                                      recursive=recursive)], caller)

    async def record(self, stream: str, changes: list[c.RecordFileChange], caller: Caller) -> None:
        if not changes:
            return
        try:
            await self.journal.execute_all(stream, list(changes), actor=caller.actor, request_id=caller.request_id)
        except IllegalTransition as e:
            log.warning("file change in %s not journaled: %s", stream, e.message)


def written(entry: Entry, data: bytes) -> c.RecordFileChange:
    return c.RecordFileChange(path=shown_path(entry.path), op="write", size=len(data),
                              sha256=hashlib.sha256(data).hexdigest())
