"""HTTP routes for a session's whole /workspace as one tar stream (the Agents SDK provider's
persist_workspace / hydrate_workspace):

- `GET  /v1/sessions/{id}/fs/archive` → `application/x-tar`, streamed while it is packed;
- `POST /v1/sessions/{id}/fs/archive[?external_symlinks=true]` (body: a tar, optionally
  gzip/bz2/xz) → `{ok, members}`, extracted while it arrives (at most
  `limits.max_archive_bytes`; the event loop hands the body to the extractor thread through a
  small queue); symlinks pointing out of /workspace only on request.

The tar is made and read host-side by `sandkasten.files.workspace_archive` (confined like the file
API) in a worker thread; an OS pipe joins the packing thread to the response, a small queue of
chunks joins the request body to the extracting thread, so neither side ever holds the
archive in memory. A failure after the first byte went out cannot
change the status any more: the connection is then cut before the chunked body's end, so a
client never mistakes a cut tar for a whole one."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import queue
from contextlib import suppress

from sanic import Request, json
from sanic.exceptions import PayloadTooLarge
from sanic.http import Http

from sandkasten.api import blueprint, daemon_of, params
from sandkasten.api.files import session_fs
from sandkasten.api.sessions import require_running, session_row
from sandkasten.errors import SandkastenError, TooLarge
from sandkasten.files.workspace_archive import WorkspaceArchive

bp = blueprint("archive", url_prefix="/v1")
log = logging.getLogger("sandkasten.api.archive")
CHUNK = 1 << 16


async def _archive(request: Request, sid: str, verb: str) -> WorkspaceArchive:
    d = daemon_of(request)
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
        connection = request.transport
        if isinstance(connection, asyncio.Transport):    # (typed as a protocol that lacks abort)
            connection.abort()                           # no chunked end: the client sees a cut
        else:
            connection.close()
        return
    log.debug("archive of session %s: %d members", sid, members)
    await response.eof()


@bp.post("/sessions/<sid>/fs/archive", stream=True)
async def upload_archive(request: Request, sid: str):
    d = daemon_of(request)
    archive = await _archive(request, sid, "extract an archive")
    external = params.flag(request, "external_symlinks")
    limit = d.cfg.limits.max_archive_bytes
    stream = request.stream
    if not isinstance(stream, Http):   # a streamed handler always has one (typed as its base class)
        raise SandkastenError("unable to extract an archive: the request has no body stream")
    stream.request_max_size = limit
    body = BodyReader()

    def unpack() -> int:
        with io.BufferedReader(body, CHUNK) as source:
            return archive.unpack(source, external_symlinks=external)

    unpacking = asyncio.ensure_future(asyncio.to_thread(unpack))
    too_large = False
    try:
        while not unpacking.done() and (chunk := await stream.read()) is not None:
            # the extractor's thread takes from a queue.Queue: no event to await, a 1 ms poll
            while not body.offer(chunk) and not unpacking.done():  # noqa: ASYNC110
                await asyncio.sleep(0.001)   # the extractor is behind: hold the rest of the body back
    except PayloadTooLarge:
        too_large = True
    finally:
        current = asyncio.current_task()
        cancelling = current is not None and current.cancelling() > 0
        body.finish(cut=too_large or (not unpacking.done() and cancelling))
    if too_large:
        with suppress(SandkastenError):                   # it saw the cut; the size is the reason
            await unpacking
        raise TooLarge(f"unable to extract the archive: it is larger than the limit of {limit} bytes "
                       "(limits.max_archive_bytes)", limit=limit)
    return json({"ok": True, "members": await unpacking})


class BodyReader(io.RawIOBase):
    """A request body as a blocking file for the extractor thread, fed chunk by chunk by the
    event loop through a small queue: no OS pipe, so no descriptor crosses threads. A cut
    body (too large, client gone) reads as an error, never as a clean end of the tar."""

    def __init__(self, depth: int = 8) -> None:
        super().__init__()
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self.pending = b""
        self.ended = False
        self.cut = False

    def readable(self) -> bool:
        return True

    def offer(self, chunk: bytes) -> bool:
        """Hand over one chunk; False when the queue is full (try again shortly)."""
        try:
            self.chunks.put_nowait(chunk)
            return True
        except queue.Full:
            return False

    def finish(self, cut: bool = False) -> None:
        self.cut = cut
        self.ended = True   # seen by a reader waiting on an empty queue within its poll

    def readinto(self, buffer) -> int:
        while not self.pending:
            try:
                item = self.chunks.get(timeout=0.05)
            except queue.Empty:
                if self.ended:
                    if self.cut:
                        raise OSError(errno.EPIPE, "the request body was cut off") from None
                    return 0
                continue
            self.pending = item or b""
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n
