"""HTTP routes for files in a session's /workspace. Host-side access confined by
`WorkspaceFS` (openat2 RESOLVE_BENEATH): the sandbox user controls that directory."""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING

from sanic import Request, json
from sanic.headers import parse_content_header
from sanic.request.form import parse_multipart_form

from sandkasten import intake
from sandkasten.api import blueprint, caller, daemon_of, params
from sandkasten.api.sessions import json_body, require_running, session_row
from sandkasten.errors import InvalidRequest, PathRefused, TooLarge
from sandkasten.files.workspace_fs import MOUNT_POINT, Entry, WorkspaceFS
from sandkasten.service.files import shown_path

if TYPE_CHECKING:
    from sandkasten.daemon import Daemon

bp = blueprint("files", url_prefix="/v1")


def session_fs(daemon: Daemon, row: dict) -> WorkspaceFS:
    root = (daemon.cfg.workspaces_dir / row["workspace_id"] if row["workspace_id"]
            else daemon.runtime.paths(row["id"]).workspace)
    sec = daemon.cfg.security
    return WorkspaceFS(root, uid=sec.run_as_uid, gid=sec.run_as_gid,
                       max_file_bytes=daemon.cfg.limits.max_file_bytes)


def present_entry(e: Entry) -> dict:
    return {"path": shown_path(e.path), "name": e.name, "type": e.type,
            "size": e.size, "mode": oct(e.mode & 0o7777), "mtime": e.mtime}


def write_request(body, limit: int) -> tuple[str, bytes]:
    """(path, bytes) of a JSON write body: {path, text | content_base64} (sandkasten.schema)."""
    return intake.write_request(body, limit)


def upload_name(name: object) -> str:
    """A multipart file name is one plain name; where it goes is the form field `dir`."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(ch in name for ch in "/\\\0"):
        raise PathRefused(f"unable to upload {name!r}: a file name must be a single name without "
                          "'/', '\\' or NUL (choose the directory with the form field 'dir')", path=str(name))
    return name


def multipart(request: Request):
    """(fields, files) of a multipart/form-data body, parsed here rather than by `request.form`,
    which logs a traceback and answers "no files" for a body it cannot parse."""
    kind, options = parse_content_header(request.headers.get("content-type", ""))
    if kind != "multipart/form-data":
        raise InvalidRequest(f"invalid upload: expected multipart/form-data, got {request.content_type!r}")
    boundary = options.get("boundary")
    if not isinstance(boundary, str) or not boundary or not boundary.isascii():
        raise InvalidRequest("invalid upload: the content-type multipart/form-data names no boundary")
    try:
        return parse_multipart_form(request.body, boundary.encode())
    except Exception as e:  # noqa: BLE001 - Sanic's parser raises whatever the bytes provoke
        raise InvalidRequest(f"invalid upload: malformed multipart body ({type(e).__name__})") from None


def parse_uploads(request: Request, fs: WorkspaceFS) -> list[tuple[str, bytes]]:
    """(path, bytes) of every file of a multipart/form-data body, placed in the form field `dir`
    (default /workspace). All names, paths and sizes are checked here, before anything is written."""
    form, parts = multipart(request)
    target = form.get("dir") or MOUNT_POINT
    files = [f for field in parts.values() for f in field]
    if not files:
        raise InvalidRequest("invalid upload: no files in the form (send them as file parts)")
    paths = [target.rstrip("/") + "/" + upload_name(f.name) for f in files]
    if len(set(paths)) != len(paths):
        raise InvalidRequest("invalid upload: the same file name appears twice")
    for f, path in zip(files, paths, strict=True):
        fs.normalize(path, "upload")   # refuses an escaping 'dir'
        if len(f.body) > fs.max_file_bytes:
            raise TooLarge(f"unable to upload {f.name!r}: {len(f.body)} bytes is above the limit of "
                           f"{fs.max_file_bytes}", limit=fs.max_file_bytes, name=f.name)
    return [(path, f.body) for f, path in zip(files, paths, strict=True)]


async def _fs(request: Request, sid: str, verb: str) -> WorkspaceFS:
    d = daemon_of(request)
    row = await session_row(d, sid)
    require_running(row, verb)
    return session_fs(d, row)


@bp.post("/sessions/<sid>/fs/write")
async def write_file(request: Request, sid: str):
    fs = await _fs(request, sid, "write a file")
    path, data = write_request(json_body(request), fs.max_file_bytes)
    [entry] = await daemon_of(request).service.files.write(sid, fs, [(path, data)], caller(request))
    return json({"ok": True, **present_entry(entry)})


@bp.post("/sessions/<sid>/fs/upload")
async def upload_files(request: Request, sid: str):
    fs = await _fs(request, sid, "upload files")
    entries = await daemon_of(request).service.files.write(sid, fs, parse_uploads(request, fs), caller(request))
    return json({"ok": True, "entries": [present_entry(e) for e in entries]})


@bp.get("/sessions/<sid>/fs/read")
async def read_file(request: Request, sid: str):
    fs = await _fs(request, sid, "read a file")
    path = params.required(request, "path", "read")
    max_bytes = params.count(request, "max_bytes")
    data, truncated, size = await asyncio.to_thread(fs.read, path, max_bytes)
    return json({"path": "/workspace/" + fs.normalize(path), "content_base64": base64.b64encode(data).decode(),
                 "size": size, "truncated": truncated})


@bp.get("/sessions/<sid>/fs")
async def list_files(request: Request, sid: str):
    fs = await _fs(request, sid, "list files")
    recursive = params.flag(request, "recursive")
    entries = await asyncio.to_thread(fs.list, request.args.get("path", ""), recursive)
    return json({"entries": [present_entry(e) for e in entries]})


@bp.delete("/sessions/<sid>/fs")
async def delete_file(request: Request, sid: str):
    fs = await _fs(request, sid, "delete a file")
    path = params.required(request, "path", "delete")
    recursive = params.flag(request, "recursive")
    await daemon_of(request).service.files.delete(sid, fs, path, recursive, caller(request))
    return json({"ok": True})
