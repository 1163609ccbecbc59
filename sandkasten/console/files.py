"""Browsing the files of a session's /workspace or of a persistent workspace: a directory
listing, downloads, and uploads (the page's script posts them to the JSON API's upload route).

Who runs this: the daemon's event loop; file work in worker threads through `WorkspaceFS`, the
same confined access the JSON API uses (no path from a request leaves the workspace)."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from sanic import Request
from sanic.response import raw

from sandkasten.api import blueprint, daemon_of
from sandkasten.api.files import present_entry, session_fs
from sandkasten.api.sessions import require_running, session_row
from sandkasten.api.workspaces import existing, workspace_fs
from sandkasten.console.render import page
from sandkasten.files.workspace_fs import MOUNT_POINT, WorkspaceFS

bp = blueprint("console_files", url_prefix="/console")
LISTED = 2000   # entries shown per directory


def crumbs(rel: str) -> list[tuple[str, str]]:
    """(name, path) of each directory from /workspace down to `rel`."""
    out, path = [("workspace", MOUNT_POINT)], MOUNT_POINT
    for part in [p for p in rel.split("/") if p]:
        path += "/" + part
        out.append((part, path))
    return out


async def listing_page(request: Request, fs: WorkspaceFS, *, base: str, upload_url: str | None, **context):
    path = request.args.get("path", MOUNT_POINT)
    rel = fs.normalize(path, "list")
    entries = await asyncio.to_thread(fs.list, rel, False, LISTED + 1)
    shown = sorted((present_entry(e) for e in entries[:LISTED]), key=lambda e: (e["type"] != "dir", e["name"]))
    return page(request, "files.html", entries=shown, more=len(entries) > LISTED, crumbs=crumbs(rel),
                here=MOUNT_POINT + ("/" + rel if rel else ""), base=base, upload_url=upload_url, **context)


async def download(fs: WorkspaceFS, path: str | None):
    rel = fs.normalize(path or "", "download")
    data, _, _ = await asyncio.to_thread(fs.read, rel, None)
    name = rel.rsplit("/", 1)[-1] or "file"
    return raw(data, content_type="application/octet-stream",
               headers={"content-disposition": f"attachment; filename*=UTF-8''{quote(name, safe='')}"})


async def _session_fs(request: Request, sid: str, verb: str) -> tuple[dict, WorkspaceFS]:
    d = daemon_of(request)
    row = await session_row(d, sid)
    require_running(row, verb)
    return row, session_fs(d, row)


@bp.get("/sessions/<sid>/files")
async def session_files(request: Request, sid: str):
    _, fs = await _session_fs(request, sid, "list files")
    return await listing_page(request, fs, base=f"/console/sessions/{sid}/files",
                              upload_url=f"/v1/sessions/{sid}/fs/upload", section="sessions",
                              title=f"Files of session {sid}", back=(f"/console/sessions/{sid}", sid))


@bp.get("/sessions/<sid>/files/download")
async def session_download(request: Request, sid: str):
    _, fs = await _session_fs(request, sid, "download a file")
    return await download(fs, request.args.get("path"))


@bp.get("/workspaces/<wid>/files")
async def workspace_files(request: Request, wid: str):
    d = daemon_of(request)
    fs = workspace_fs(d, await existing(d, wid, "list files of"))
    return await listing_page(request, fs, base=f"/console/workspaces/{wid}/files",
                              upload_url=f"/v1/workspaces/{wid}/fs/upload", section="workspaces",
                              title=f"Files of workspace {wid}", back=("/console/workspaces", "workspaces"))


@bp.get("/workspaces/<wid>/files/download")
async def workspace_download(request: Request, wid: str):
    d = daemon_of(request)
    fs = workspace_fs(d, await existing(d, wid, "download a file of"))
    return await download(fs, request.args.get("path"))
