"""HTTP routes for persistent workspaces: list, delete, and their files without a session.

Who runs this: the daemon's event loop; file work in worker threads. A workspace is a directory
`workspaces/<id>` that sessions bind-mount at /workspace, and a stream `ws:<id>` in the journal
(created, deleted). Files are reached host-side through `WorkspaceFS`, exactly as a session's
file API does — the sandbox user owns the contents, so nothing here follows their symlinks.
Deleting a workspace first destroys the sessions using it (through the journal, like any destroy),
then journals the deletion, then removes the directory — never while anything is mounted in it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import stat

from sanic import Request, json

from sandkasten import intake
from sandkasten.api import blueprint, params
from sandkasten.api.files import audited, parse_uploads, present_entry, write_request, write_uploads, written
from sandkasten.api.sessions import json_body, settle
from sandkasten.domain import commands as c
from sandkasten.domain.events import workspace_stream
from sandkasten.domain.workspace import ACTIVE, WorkspaceState
from sandkasten.errors import (IllegalTransition, InvalidRequest, SandboxError, WorkspaceInUse,
                               WorkspaceNotFound)
from sandkasten.runtime.procfs import mounts_under
from sandkasten.files.workspace_fs import WorkspaceFS

bp = blueprint("workspaces", url_prefix="/v1")


def workspace_fs(daemon, wid: str) -> WorkspaceFS:
    sec = daemon.cfg.security
    return WorkspaceFS(daemon.cfg.workspaces_dir / wid, uid=sec.run_as_uid, gid=sec.run_as_gid,
                       max_file_bytes=daemon.cfg.limits.max_file_bytes)


async def existing(daemon, wid: str, verb: str) -> str:
    """The workspace id, validated, if the journal says the workspace exists; else 404."""
    intake.check_workspace_id(wid)
    state = await daemon.journal.workspace_state(workspace_stream(wid))
    if not isinstance(state, WorkspaceState) or state.status != ACTIVE:
        raise WorkspaceNotFound(f"unable to {verb} workspace {wid!r}: no such workspace", workspace_id=wid)
    return wid


def writable(daemon, wid: str) -> WorkspaceFS:
    """A workspace a client may write to (and so create): a valid id, workspaces enabled."""
    intake.check_workspace_id(wid)
    if not daemon.cfg.workspace.enabled:
        raise InvalidRequest("unable to create workspace: persistent workspaces are disabled in this daemon")
    return workspace_fs(daemon, wid)


async def ensure_created(daemon, wid: str) -> None:
    """Writing creates a workspace: directory owned by the sandbox user + `workspace.created`
    (the executor's method, the one place that creates workspaces)."""
    state = await daemon.journal.workspace_state(workspace_stream(wid))
    if isinstance(state, WorkspaceState) and state.status == ACTIVE and (daemon.cfg.workspaces_dir / wid).is_dir():
        return
    await daemon.executor._ensure_workspace(wid, "api")


async def users(daemon, wid: str) -> list[dict]:
    """Sessions not ended (running, starting, lost, being destroyed) that mount this workspace."""
    return [s for s in await daemon.journal.sessions() if s["workspace_id"] == wid]


def disk_usage(root) -> tuple[int, int]:
    """(bytes of regular files, bytes allocated) below root, never following a symlink.
    fwalk holds descriptors, so a directory swapped for a symlink mid-walk is not entered."""
    size = blocks = 0
    try:
        for _dirpath, _dirs, names, dir_fd in os.fwalk(root, follow_symlinks=False):
            for name in names:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue   # removed while we looked
                if stat.S_ISREG(st.st_mode):
                    size += st.st_size
                blocks += st.st_blocks * 512
    except OSError:
        pass
    return size, blocks


@bp.get("/workspaces")
async def list_workspaces(request: Request):
    return json(await listing(request.app.ctx.daemon))


async def listing(d) -> list[dict]:
    """Workspaces not deleted: size on disk and the sessions using them (the API and the console)."""
    live = await d.journal.sessions()
    out = []
    for row in await d.journal.workspaces():
        if row["deleted_at"] is not None:
            continue
        size, used = await asyncio.to_thread(disk_usage, d.cfg.workspaces_dir / row["id"])
        out.append({"id": row["id"], "created_at": row["created_at"], "last_session_id": row["last_session_id"],
                    "size_bytes": size, "disk_bytes": used,
                    "in_use_by": [s["id"] for s in live if s["workspace_id"] == row["id"]]})
    return out


@bp.delete("/workspaces/<wid>")
async def delete_workspace(request: Request, wid: str):
    d = request.app.ctx.daemon
    await existing(d, wid, "delete")
    force = params.flag(request, "force")
    using = await users(d, wid)
    if using and not force:
        ids = [s["id"] for s in using]
        raise WorkspaceInUse(f"unable to delete workspace {wid!r}: in use by session(s) {', '.join(ids)} "
                             "(destroy them first, or pass force=true)", sessions=ids)
    for s in using:
        if s["status"] != "destroying":
            try:
                await d.journal.execute(s["id"], c.RequestDestroy(reason="workspace deleted"),
                                        actor=request.ctx.actor, request_id=request.ctx.request_id)
            except IllegalTransition:
                pass   # it ended meanwhile
        await settle(d, d.executor.ensure_destroyed(s["id"]),
                     f"session {s['id']} is destroyed once the daemon is back; repeat the DELETE to finish")
    await d.journal.execute(workspace_stream(wid), c.DeleteWorkspace(workspace_id=wid),
                            actor=request.ctx.actor, request_id=request.ctx.request_id)
    await asyncio.to_thread(remove_dir, d.cfg.workspaces_dir, wid)
    return json({"ok": True, "destroyed_sessions": [s["id"] for s in using]})


def remove_dir(base, wid: str) -> None:
    """rm -r workspaces/<wid>: only a real directory right below `base`, nothing mounted in it
    (shutil.rmtree works by descriptors on Linux, so a symlink inside is removed, not followed)."""
    path = base / wid
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path) or os.path.realpath(path) != os.path.join(
            os.path.realpath(base), wid):
        raise SandboxError(f"unable to remove workspace {wid}: {path} is not a directory inside {base}")
    if mounts_under(path):
        raise SandboxError(f"unable to remove workspace {wid}: something is still mounted below it")
    try:
        shutil.rmtree(path)
    except OSError as e:
        raise SandboxError(f"unable to remove workspace {wid}: {e.strerror} ({e.filename})") from None


@bp.post("/workspaces/<wid>/fs/write")
async def write_file(request: Request, wid: str):
    d = request.app.ctx.daemon
    fs = writable(d, wid)
    path, data = write_request(json_body(request), fs.max_file_bytes)
    fs.normalize(path, "write")   # refused before the workspace is created
    await ensure_created(d, wid)
    entry = present_entry(await asyncio.to_thread(fs.write, path, data))
    await audited(request, workspace_stream(wid), [written(entry, data)])
    return json({"ok": True, "workspace_id": wid, **entry})


@bp.post("/workspaces/<wid>/fs/upload")
async def upload_files(request: Request, wid: str):
    d = request.app.ctx.daemon
    fs = writable(d, wid)
    uploads = parse_uploads(request, fs)
    await ensure_created(d, wid)
    done = await write_uploads(fs, uploads)
    await audited(request, workspace_stream(wid), [written(entry, data) for entry, data in done])
    return json({"ok": True, "workspace_id": wid, "entries": [entry for entry, _ in done]})


@bp.get("/workspaces/<wid>/fs")
async def list_files(request: Request, wid: str):
    d = request.app.ctx.daemon
    fs = workspace_fs(d, await existing(d, wid, "list files of"))
    recursive = params.flag(request, "recursive")
    entries = await asyncio.to_thread(fs.list, request.args.get("path", ""), recursive)
    return json({"workspace_id": wid, "entries": [present_entry(e) for e in entries]})


@bp.get("/workspaces/<wid>/fs/read")
async def read_file(request: Request, wid: str):
    d = request.app.ctx.daemon
    fs = workspace_fs(d, await existing(d, wid, "read a file of"))
    path = params.required(request, "path", "read")
    max_bytes = params.count(request, "max_bytes")
    data, truncated, size = await asyncio.to_thread(fs.read, path, max_bytes)
    return json({"workspace_id": wid, "path": "/workspace/" + fs.normalize(path),
                 "content_base64": base64.b64encode(data).decode(), "size": size,
                 "truncated": truncated})
