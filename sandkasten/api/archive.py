"""HTTP routes for a session's whole /workspace as one tar stream (the Agents SDK provider's
persist_workspace / hydrate_workspace):

- `GET  /v1/sessions/{id}/fs/archive` → `application/x-tar`, streamed while it is packed;
- `POST /v1/sessions/{id}/fs/archive[?external_symlinks=true]` (body: a tar, optionally
  gzip/bz2/xz) → `{ok, members}`, extracted while it arrives (at most
  `limits.max_archive_bytes`); symlinks pointing out of /workspace only on request.

The tar is made and read host-side by `sandkasten.workspace_archive` (confined like the file
API) in a worker thread; an OS pipe joins that thread to the response or the request body, so
neither side ever holds the archive in memory. A failure after the first byte went out cannot
change the status any more: the connection is then cut before the chunked body's end, so a
client never mistakes a cut tar for a whole one."""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import suppress

from sanic import Blueprint, Request, json
from sanic.exceptions import PayloadTooLarge

from sandkasten.api import params
from sandkasten.api.files import session_fs
from sandkasten.api.sessions import require_running, session_row
from sandkasten.errors import SandkastenError, TooLarge
from sandkasten.workspace_archive import WorkspaceArchive

bp = Blueprint("archive", url_prefix="/v1")
log = logging.getLogger("sandkasten.api.archive")
CHUNK = 1 << 16


async def _archive(request: Request, sid: str, verb: str) -> WorkspaceArchive:
    d = request.app.ctx.daemon
    row = await session_row(d, sid)
    require_running(row, verb)
    fs = session_fs(d, row)
    return WorkspaceArchive(fs.root, uid=fs.uid, gid=fs.gid, max_file_bytes=fs.max_file_bytes)


@bp.get("/sessions/<sid>/fs/archive")
async def download_archive(request: Request, sid: str):
    archive = await _archive(request, sid, "archive the workspace")
    await asyncio.to_thread(archive.stat, "")          # a missing workspace is a 404, before any byte
    loop = asyncio.get_running_loop()
    rfd, wfd = os.pipe()
    reader = asyncio.StreamReader(limit=CHUNK * 4)
    pipe = os.fdopen(rfd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)

    def pack() -> int:
        with os.fdopen(wfd, "wb", buffering=CHUNK) as out:   # closing it is the reader's EOF
            return archive.pack(out)

    packing = asyncio.ensure_future(asyncio.to_thread(pack))
    response = await request.respond(content_type="application/x-tar", headers={
        "content-disposition": f'attachment; filename="{sid}-workspace.tar"'})
    try:
        while chunk := await reader.read(CHUNK):
            await response.send(chunk)
    finally:
        transport.close()                                # a packer still writing gets EPIPE and stops
    try:
        members = await packing
    except (SandkastenError, OSError) as e:
        log.warning("archive of session %s failed while streaming: %s", sid, e)
        request.transport.abort()                        # no chunked end: the client sees a cut
        return
    log.debug("archive of session %s: %d members", sid, members)
    await response.eof()


@bp.post("/sessions/<sid>/fs/archive", stream=True)
async def upload_archive(request: Request, sid: str):
    d = request.app.ctx.daemon
    archive = await _archive(request, sid, "extract an archive")
    external = params.flag(request, "external_symlinks")
    limit = d.cfg.limits.max_archive_bytes
    request.stream.request_max_size = limit
    loop = asyncio.get_running_loop()
    rfd, wfd = os.pipe()
    transport, protocol = await loop.connect_write_pipe(lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
                                                        os.fdopen(wfd, "wb", buffering=0))
    writer = asyncio.StreamWriter(transport, protocol, None, loop)

    def unpack() -> int:
        with os.fdopen(rfd, "rb") as source:
            return archive.unpack(source, external_symlinks=external)

    unpacking = asyncio.ensure_future(asyncio.to_thread(unpack))
    too_large = False
    try:
        while not unpacking.done() and (chunk := await request.stream.read()) is not None:
            writer.write(chunk)
            await writer.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass                                              # the extractor stopped: its error says why
    except PayloadTooLarge:
        too_large = True
    finally:
        writer.close()
        with suppress(BrokenPipeError, ConnectionResetError):
            await writer.wait_closed()
    if too_large:
        with suppress(SandkastenError):                   # it saw the cut; the size is the reason
            await unpacking
        raise TooLarge(f"unable to extract the archive: it is larger than the limit of {limit} bytes "
                       "(limits.max_archive_bytes)", limit=limit)
    return json({"ok": True, "members": await unpacking})
