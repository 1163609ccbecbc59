"""Persistent workspaces: create on first write, delete through the journal.

Who runs this: the HTTP handlers (`/v1/workspaces`). Deleting a workspace first destroys the
sessions using it (through the journal, like any destroy), then journals `workspace.deleted`;
the executor removes the directory (`Executor.ensure_workspace_removed`), never while anything
is mounted in it, and the start-up reconcile removes what a crash left of a deleted one.
"""

from __future__ import annotations

from sandkasten import intake
from sandkasten.config import Config
from sandkasten.control.executor import Executor
from sandkasten.domain import commands as c
from sandkasten.domain.events import workspace_stream
from sandkasten.domain.workspace import ACTIVE, WorkspaceState
from sandkasten.errors import IllegalTransition, InvalidRequest, WorkspaceInUse, WorkspaceNotFound
from sandkasten.files.workspace_fs import Entry, WorkspaceFS
from sandkasten.service.files import Files
from sandkasten.service.sessions import Caller
from sandkasten.service.waiting import Waiter
from sandkasten.store.journal import Journal


class Workspaces:
    def __init__(self, cfg: Config, journal: Journal, waiter: Waiter, files: Files, executor: Executor):
        self.cfg = cfg
        self.journal = journal
        self.waiter = waiter
        self.files = files
        self.executor = executor

    def fs(self, wid: str) -> WorkspaceFS:
        sec = self.cfg.security
        return WorkspaceFS(self.cfg.workspaces_dir / wid, uid=sec.run_as_uid, gid=sec.run_as_gid,
                           max_file_bytes=self.cfg.limits.max_file_bytes)

    async def existing(self, wid: str, verb: str) -> str:
        """The workspace id, validated, if the journal says the workspace exists; else 404."""
        intake.check_workspace_id(wid)
        state = await self.journal.workspace_state(workspace_stream(wid))
        if not isinstance(state, WorkspaceState) or state.status != ACTIVE:
            raise WorkspaceNotFound(f"unable to {verb} workspace {wid!r}: no such workspace", workspace_id=wid)
        return wid

    def writable(self, wid: str) -> WorkspaceFS:
        """A workspace a client may write to (and so create): a valid id, workspaces enabled."""
        intake.check_workspace_id(wid)
        if not self.cfg.workspace.enabled:
            raise InvalidRequest("unable to create workspace: persistent workspaces are disabled in this daemon")
        return self.fs(wid)

    async def ensure_created(self, wid: str) -> None:
        """Writing creates a workspace: directory owned by the sandbox user + `workspace.created`
        (the executor's, the one place that creates workspaces)."""
        state = await self.journal.workspace_state(workspace_stream(wid))
        if isinstance(state, WorkspaceState) and state.status == ACTIVE and (self.cfg.workspaces_dir / wid).is_dir():
            return
        await self.executor.ensure_workspace(wid)

    async def write(self, wid: str, fs: WorkspaceFS, writes: list[tuple[str, bytes]], caller: Caller) -> list[Entry]:
        """Write files into the workspace (creating it), journaled on its stream."""
        await self.ensure_created(wid)
        return await self.files.write(workspace_stream(wid), fs, writes, caller)

    async def users(self, wid: str) -> list[dict]:
        """Sessions not ended (running, starting, lost, being destroyed) that mount this workspace."""
        return [s for s in await self.journal.sessions() if s["workspace_id"] == wid]

    async def delete(self, wid: str, force: bool, caller: Caller) -> list[str]:
        """Delete the workspace (refused while in use unless `force`: then its sessions are
        destroyed first); the ids of the sessions destroyed for it."""
        await self.existing(wid, "delete")
        using = await self.users(wid)
        if using and not force:
            ids = [s["id"] for s in using]
            raise WorkspaceInUse(f"unable to delete workspace {wid!r}: in use by session(s) {', '.join(ids)} "
                                 "(destroy them first, or pass force=true)", sessions=ids)
        for s in using:
            if s["status"] != "destroying":
                try:
                    await self.journal.execute(s["id"], c.RequestDestroy(reason="workspace deleted"),
                                               actor=caller.actor, request_id=caller.request_id)
                except IllegalTransition:
                    pass   # it ended meanwhile
            await self.waiter.destroyed(s["id"], "; repeat the DELETE to finish")
        await self.journal.execute(workspace_stream(wid), c.DeleteWorkspace(workspace_id=wid),
                                   actor=caller.actor, request_id=caller.request_id)
        await self.waiter.workspace_removed(wid)
        return [s["id"] for s in using]
