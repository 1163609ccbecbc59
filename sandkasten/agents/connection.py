"""The provider's line to one Sandkasten daemon: the typed asyncio client for calls, a plain
httpx client for the workspace tar streams, and the tag that ties every request to the agent
run making it.

The tag: inside an Agents SDK trace (every `Runner.run` is one, or `with trace(...)` around
it), each request carries `X-Agent-Run: <trace id>`; the daemon journals it in the actor of
every event the request appends, so `sandkasten audit export` names the run behind each command.
A run resumed in a new process under the same trace id (`RunConfig(trace_id=...)` or
`trace(..., trace_id=...)`) keeps the same tag.

Both clients retry while the daemon is away (a restart after SIGKILL included) for `retry_for`
seconds; a command runs once however often its request is repeated (one Idempotency-Key)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import IO

import httpx
from agents.tracing import get_current_trace

from sandkasten.client import AsyncClient
from sandkasten.client import protocol as p

RUN_HEADER = "X-Agent-Run"
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")   # what the daemon accepts
CHUNK = 1 << 16
ARCHIVE_TIMEOUT = httpx.Timeout(60.0, read=600.0)


def current_run() -> str | None:
    """The trace id of the agent run this task is part of, if any (a disabled trace has none)."""
    trace = get_current_trace()
    trace_id = getattr(trace, "trace_id", None) if trace is not None else None
    if not isinstance(trace_id, str) or trace_id == "no-op" or not RUN_ID.match(trace_id):
        return None
    return trace_id


class RunTagging(httpx.AsyncBaseTransport):
    """Adds `X-Agent-Run` to each request made inside a trace."""

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        run = current_run()
        if run is not None:
            request.headers[RUN_HEADER] = run
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Connection:
    def __init__(self, base_url: str | None, api_key: str | None, *, retry_for: float = 60.0) -> None:
        self.url = p.base_url(base_url)
        self.retry_for = retry_for
        self.loop = asyncio.get_running_loop()
        self.api = AsyncClient(self.url, api_key, retry_for=retry_for, transport=RunTagging())
        self._raw = httpx.AsyncClient(base_url=self.url, headers=p.auth_headers(api_key),
                                      timeout=ARCHIVE_TIMEOUT, transport=RunTagging())

    async def aclose(self) -> None:
        await self.api.close()
        await self._raw.aclose()

    # -- the workspace as one tar stream -------------------------------------------------
    async def download_archive(self, session_id: str, sink: IO[bytes]) -> int:
        """Write the tar of the session's /workspace into `sink` as it arrives; bytes written.
        A transfer cut by a restarting daemon starts over (the sink is rewound)."""
        path = f"/v1/sessions/{session_id}/fs/archive"
        patience = p.Patience(self.retry_for)
        while True:
            sink.seek(0)
            sink.truncate()
            written = 0
            try:
                async with self._raw.stream("GET", path) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise p.error_of(response)
                    async for chunk in response.aiter_bytes(CHUNK):
                        sink.write(chunk)
                        written += len(chunk)
                        patience.progress()
                sink.seek(0)
                return written
            except httpx.TransportError as e:
                await self._wait(patience, e)

    async def upload_archive(self, session_id: str, source: IO[bytes], external_symlinks: bool = False) -> int:
        """Send a tar (read from `source` chunk by chunk) to be extracted into the session's
        /workspace; the number of members extracted. Repeated from the start when the daemon
        restarts meanwhile, if `source` can be rewound (extracting twice gives the same files).
        external_symlinks: keep symlinks pointing out of /workspace (never followed on the host)."""
        path = f"/v1/sessions/{session_id}/fs/archive" + ("?external_symlinks=true" if external_symlinks else "")
        start = source.tell() if source.seekable() else None
        patience = p.Patience(self.retry_for)
        while True:
            try:
                response = await self._raw.post(path, content=_chunks(source),
                                                 headers={"content-type": "application/x-tar"})
                if response.status_code >= 400:
                    raise p.error_of(response)
                return int(response.json().get("members", 0))
            except httpx.TransportError as e:
                if start is None:
                    raise p.unreachable(self.url, e) from e
                source.seek(start)
                await self._wait(patience, e)

    async def _wait(self, patience: p.Patience, exc: BaseException) -> None:
        delay = patience.next_delay(exc)
        if delay is None:
            raise p.unreachable(self.url, exc) from exc
        await asyncio.sleep(delay)


async def _chunks(source: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := source.read(CHUNK):
        yield chunk if isinstance(chunk, bytes) else bytes(chunk)
