"""HTTP routes for persistent workspaces: list, delete, and their files without a session.

Who runs this: the daemon's event loop; file work in worker threads. A workspace is a directory
`workspaces/<id>` that sessions bind-mount at /workspace, and a stream `ws:<id>` in the journal
(created, deleted). Files are reached host-side through `WorkspaceFS`, exactly as a session's
file API does — the sandbox user owns the contents, so nothing here follows their symlinks.
Deleting a workspace first destroys the sessions using it (through the journal, like any destroy),
then journals the deletion; the executor removes the directory — never while anything is mounted in
it (`sandkasten.service.workspaces`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from typing import TYPE_CHECKING

from sanic import Request, json

from sandkasten.api import blueprint, caller, daemon_of, params
from sandkasten.api.files import parse_uploads, present_entry, write_request
from sandkasten.api.sessions import json_body
from sandkasten.files.workspace_fs import WorkspaceFS

if TYPE_CHECKING:
    from sandkasten.daemon import Daemon

bp = blueprint("workspaces", url_prefix="/v1")


def workspace_fs(daemon: Daemon, wid: str) -> WorkspaceFS:
    return daemon.service.workspaces.fs(wid)


async def existing(daemon: Daemon, wid: str, verb: str) -> str:
    """The workspace id, validated, if the journal says the workspace exists; else 404."""
    return await daemon.service.workspaces.existing(wid, verb)


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
    return json(await listing(daemon_of(request)))


async def listing(d: Daemon) -> list[dict]:
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
    workspaces = daemon_of(request).service.workspaces
    await workspaces.existing(wid, "delete")   # a 404 before a bad `force` is a 400
    destroyed = await workspaces.delete(wid, params.flag(request, "force"), caller(request))
    return json({"ok": True, "destroyed_sessions": destroyed})


@bp.post("/workspaces/<wid>/fs/write")
async def write_file(request: Request, wid: str):
    workspaces = daemon_of(request).service.workspaces
    fs = workspaces.writable(wid)
    path, data = write_request(json_body(request), fs.max_file_bytes)
    fs.normalize(path, "write")   # refused before the workspace is created
    [entry] = await workspaces.write(wid, fs, [(path, data)], caller(request))
    return json({"ok": True, "workspace_id": wid, **present_entry(entry)})


@bp.post("/workspaces/<wid>/fs/upload")
async def upload_files(request: Request, wid: str):
    workspaces = daemon_of(request).service.workspaces
    fs = workspaces.writable(wid)
    entries = await workspaces.write(wid, fs, parse_uploads(request, fs), caller(request))
    return json({"ok": True, "workspace_id": wid, "entries": [present_entry(e) for e in entries]})


@bp.get("/workspaces/<wid>/fs")
async def list_files(request: Request, wid: str):
    d = daemon_of(request)
    fs = workspace_fs(d, await existing(d, wid, "list files of"))
    recursive = params.flag(request, "recursive")
    entries = await asyncio.to_thread(fs.list, request.args.get("path", ""), recursive)
    return json({"workspace_id": wid, "entries": [present_entry(e) for e in entries]})


@bp.get("/workspaces/<wid>/fs/read")
async def read_file(request: Request, wid: str):
    d = daemon_of(request)
    fs = workspace_fs(d, await existing(d, wid, "read a file of"))
    path = params.required(request, "path", "read")
    max_bytes = params.count(request, "max_bytes")
    data, truncated, size = await asyncio.to_thread(fs.read, path, max_bytes)
    return json({"workspace_id": wid, "path": "/workspace/" + fs.normalize(path),
                 "content_base64": base64.b64encode(data).decode(), "size": size,
                 "truncated": truncated})
