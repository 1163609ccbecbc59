"""The asyncio client: `AsyncClient` and `AsyncSandbox`, the same calls as `_sync` (both are
built from `protocol`), awaited. Retries as in the blocking client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import tenacity

from sandkasten.client import errors, models, protocol as p


class AsyncClient:
    """`AsyncClient(url=None, api_key=None)` reads `SANDKASTEN_URL` (default http://127.0.0.1:8080)
    and `SANDKASTEN_API_KEY`. `retry_for` is how long (seconds) to keep retrying while the
    daemon is unreachable."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 retry_for: float = 60.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = p.base_url(url)
        self.retry_for = retry_for
        self._http = httpx.AsyncClient(base_url=self.url, headers=p.auth_headers(api_key), timeout=timeout,
                                       transport=transport)

    # -- plumbing -----------------------------------------------------------
    def _retrying(self, idempotent: bool) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(retry=tenacity.retry_if_exception(p.retryable(idempotent)),
                                      stop=tenacity.stop_after_delay(self.retry_for),
                                      wait=tenacity.wait_exponential(multiplier=0.05, max=1.0), reraise=True)

    async def _run[T](self, call: p.Call[T]) -> T:
        try:
            async for attempt in self._retrying(call.idempotent):
                with attempt:
                    response = await self._http.request(
                        call.method, call.path, params=call.params, json=call.json, files=call.files,
                        data=call.data, headers=dict(call.headers),
                        timeout=httpx.USE_CLIENT_DEFAULT if call.timeout is None else call.timeout)
                    return p.decode_answer(call, response)
        except httpx.TransportError as e:
            raise p.unreachable(self.url, e) from e
        raise AssertionError("unreachable")  # tenacity either returns or reraises

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sessions -----------------------------------------------------------
    async def create_session(self, image: str | None = None, **options: Any) -> models.Session:
        """options: workspace_id, ttl_seconds, cpu_limit, mem_limit_mb, pids_limit, env,
        network_mode, readonly_rootfs."""
        return await self._run(p.create_session(image, **options))

    async def get_session(self, session_id: str) -> models.Session:
        return await self._run(p.get_session(session_id))

    async def list_sessions(self, include_ended: bool = False) -> list[models.Session]:
        return await self._run(p.list_sessions(include_ended))

    async def destroy_session(self, session_id: str) -> None:
        await self._run(p.destroy_session(session_id))

    async def stats(self, session_id: str) -> models.Stats:
        return await self._run(p.stats(session_id))

    def session(self, image: str | None = None, **options: Any) -> AsyncSandbox:
        """A new session as a context manager, created on enter and destroyed on exit:
        `async with client.session() as sb: await sb.exec("ls")`."""
        return AsyncSandbox(self, None, image=image, **options)

    async def attach(self, session_id: str) -> AsyncSandbox:
        return AsyncSandbox(self, await self.get_session(session_id))

    # -- execs ----------------------------------------------------------------
    async def exec(self, session_id: str, cmd: str, timeout_ms: int | None = None, *,
                   raise_on_timeout: bool = False, idempotency_key: str | None = None) -> models.ExecResult:
        """Run `cmd` in the session's persistent shell. One Idempotency-Key per call (yours, or a
        fresh one) is reused by every retry, so the command runs once."""
        result = await self._run(p.exec_(session_id, cmd, timeout_ms, idempotency_key))
        if raise_on_timeout and result.timed_out:
            raise errors.CommandTimeout(f"command timed out after {result.duration_ms} ms: {cmd[:80]}",
                                        status=504, details={"exec_id": result.exec_id})
        return result

    async def exec_stream(self, session_id: str, cmd: str, timeout_ms: int | None = None
                          ) -> AsyncIterator[models.ExecEvent]:
        """Yields `ExecChunk`s as output arrives, then one `ExecDone`. A dropped connection is
        resumed with `Last-Event-ID` (nothing lost, nothing repeated); an `error` event raises."""
        async for event in self._follow(p.ExecStreamState(session_id, cmd, timeout_ms)):
            yield event

    async def _follow(self, state: p.StreamState[Any]) -> AsyncIterator[Any]:
        """Events of one stream, reconnecting with `Last-Event-ID` until its final event."""
        patience = p.Patience(self.retry_for)
        while not state.done:
            try:
                async for event in self._stream_once(state):
                    patience.progress()
                    yield event
                if not state.done:
                    raise httpx.RemoteProtocolError("the stream ended before its final event")
            except (httpx.TransportError, errors.NotReady) as e:
                delay = patience.next_delay(e)
                if delay is None:
                    raise p.unreachable(self.url, e) from e
                await asyncio.sleep(delay)

    async def _stream_once(self, state: p.StreamState[Any]) -> AsyncIterator[Any]:
        async with self._http.stream(**state.request()) as response:
            if response.status_code >= 400:
                await response.aread()
                raise p.error_of(response)
            state.opened(response)
            async for line in response.aiter_lines():
                event = state.feed(line)
                if event is not None:
                    yield event
                if state.done:
                    return
            state.feed("")  # a final event without its blank line

    async def list_execs(self, session_id: str) -> list[models.ExecRecord]:
        return await self._run(p.list_execs(session_id))

    # -- processes beside the shell --------------------------------------------
    async def start_process(self, session_id: str, cmd: str, *, cwd: str | None = None,
                            env: Mapping[str, str] | None = None, pty: Any = None, timeout_ms: int | None = None,
                            idempotency_key: str | None = None) -> models.Process:
        """Start `cmd` beside the shell (a server, a watcher, a REPL); `pty=True` or (rows, cols)
        gives it a terminal. It runs until it exits, is killed, or the session ends."""
        return await self._run(p.start_process(session_id, cmd, cwd=cwd, env=env, pty=pty, timeout_ms=timeout_ms,
                                               idempotency_key=idempotency_key))

    async def list_processes(self, session_id: str, include_ended: bool = False) -> list[models.Process]:
        return await self._run(p.list_processes(session_id, include_ended))

    async def get_process(self, session_id: str, process_id: str) -> models.Process:
        return await self._run(p.get_process(session_id, process_id))

    async def write_stdin(self, session_id: str, process_id: str, data: str | bytes, eof: bool = False) -> int:
        return await self._run(p.write_stdin(session_id, process_id, data, eof))

    async def resize(self, session_id: str, process_id: str, rows: int, cols: int) -> None:
        await self._run(p.resize(session_id, process_id, rows, cols))

    async def signal_process(self, session_id: str, process_id: str, signal: str | int) -> None:
        await self._run(p.signal_process(session_id, process_id, signal))

    async def kill_process(self, session_id: str, process_id: str) -> models.Process:
        return await self._run(p.kill_process(session_id, process_id))

    async def process_output(self, session_id: str, process_id: str, offset: int = 0,
                             max_bytes: int | None = None) -> models.ProcessOutput:
        return await self._run(p.process_output(session_id, process_id, offset, max_bytes))

    async def process_stream(self, session_id: str, process_id: str, last_event_id: str | None = None
                             ) -> AsyncIterator[models.ProcessEvent]:
        """Yields `ExecChunk`s of its output (from the start, or after `last_event_id`), then a
        `ProcessDone` when it ends; reconnects and resumes across daemon restarts."""
        async for event in self._follow(p.ProcessStreamState(session_id, process_id, last_event_id)):
            yield event

    async def get_exec(self, session_id: str, exec_id: str) -> models.ExecResult:
        return await self._run(p.get_exec(session_id, exec_id))

    # -- files in a session's /workspace ---------------------------------------------
    async def write(self, session_id: str, path: str, content: str | bytes) -> models.FileEntry:
        return await self._run(p.write(path, content, session_id=session_id))

    async def upload(self, session_id: str, files: Mapping[str, bytes], directory: str = "/workspace"
               ) -> list[models.FileEntry]:
        """Upload {name: bytes} into `directory` (multipart, binary-safe)."""
        return await self._run(p.upload(files, directory, session_id=session_id))

    async def read(self, session_id: str, path: str, max_bytes: int | None = None) -> models.FileContent:
        return await self._run(p.read(path, max_bytes, session_id=session_id))

    async def list_files(self, session_id: str, path: str = "", recursive: bool = False) -> list[models.FileEntry]:
        return await self._run(p.list_files(path, recursive, session_id=session_id))

    async def exists(self, session_id: str, path: str) -> bool:
        split = p.split_parent(path)
        if split is None:
            return True
        parent, name = split
        try:
            return any(e.name == name for e in await self.list_files(session_id, parent))
        except errors.SandkastenError as e:
            if p.missing_parent(e):
                return False
            raise

    async def delete(self, session_id: str, path: str, recursive: bool = False) -> None:
        await self._run(p.delete(path, recursive, session_id=session_id))

    # -- workspaces (files persist across sessions) ----------------------------------------
    async def list_workspaces(self) -> list[models.Workspace]:
        return await self._run(p.list_workspaces())

    async def delete_workspace(self, workspace_id: str, force: bool = False) -> None:
        await self._run(p.delete_workspace(workspace_id, force))

    async def workspace_write(self, workspace_id: str, path: str, content: str | bytes) -> models.FileEntry:
        return await self._run(p.write(path, content, workspace_id=workspace_id))

    async def workspace_upload(self, workspace_id: str, files: Mapping[str, bytes], directory: str = "/workspace"
                         ) -> list[models.FileEntry]:
        return await self._run(p.upload(files, directory, workspace_id=workspace_id))

    async def workspace_read(self, workspace_id: str, path: str, max_bytes: int | None = None) -> models.FileContent:
        return await self._run(p.read(path, max_bytes, workspace_id=workspace_id))

    async def workspace_list(self, workspace_id: str, path: str = "", recursive: bool = False
                       ) -> list[models.FileEntry]:
        return await self._run(p.list_files(path, recursive, workspace_id=workspace_id))

    async def health(self) -> dict:
        return await self._run(p.health())


class AsyncSandbox:
    """One live session bound to its client. Used as a context manager it destroys the session
    on exit (also when the block raises)."""

    def __init__(self, client: AsyncClient, info: models.Session | None, **create: Any) -> None:
        self.client, self._info, self._create = client, info, create

    @property
    def info(self) -> models.Session:
        if self._info is None:
            raise RuntimeError("the session is created on `async with` (or `await sandbox.start()`)")
        return self._info

    @property
    def id(self) -> str:
        return self.info.id

    async def start(self) -> AsyncSandbox:
        if self._info is None:
            create = dict(self._create)
            self._info = await self.client.create_session(create.pop("image", None), **create)
        return self

    async def __aenter__(self) -> AsyncSandbox:
        return await self.start()

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if self._info is None:
            return
        try:
            await self.destroy()
        except errors.SandkastenError as e:
            if exc is None:
                raise
            exc.add_note(p.destroy_failed_note(self.id, e))  # the block's own error stays the one raised

    def __repr__(self) -> str:
        if self._info is None:
            return f"AsyncSandbox(not started, {self._create!r})"
        return f"AsyncSandbox({self.id!r}, image={self.info.image!r}, status={self.info.status!r})"

    async def refresh(self) -> models.Session:
        self._info = await self.client.get_session(self.id)
        return self._info

    async def destroy(self) -> None:
        try:
            await self.client.destroy_session(self.id)
        except errors.SessionNotFound:
            pass

    async def exec(self, cmd: str, timeout_ms: int | None = None, *, raise_on_timeout: bool = False,
                   idempotency_key: str | None = None) -> models.ExecResult:
        return await self.client.exec(self.id, cmd, timeout_ms, raise_on_timeout=raise_on_timeout,
                                      idempotency_key=idempotency_key)

    def exec_stream(self, cmd: str, timeout_ms: int | None = None) -> AsyncIterator[models.ExecEvent]:
        return self.client.exec_stream(self.id, cmd, timeout_ms)

    async def write(self, path: str, content: str | bytes) -> models.FileEntry:
        return await self.client.write(self.id, path, content)

    async def upload(self, files: Mapping[str, bytes], directory: str = "/workspace") -> list[models.FileEntry]:
        return await self.client.upload(self.id, files, directory)

    async def read(self, path: str, max_bytes: int | None = None) -> models.FileContent:
        return await self.client.read(self.id, path, max_bytes)

    async def list_files(self, path: str = "", recursive: bool = False) -> list[models.FileEntry]:
        return await self.client.list_files(self.id, path, recursive)

    async def exists(self, path: str) -> bool:
        return await self.client.exists(self.id, path)

    async def delete(self, path: str, recursive: bool = False) -> None:
        await self.client.delete(self.id, path, recursive)

    async def stats(self) -> models.Stats:
        return await self.client.stats(self.id)

    async def start_process(self, cmd: str, **options: Any) -> models.Process:
        """options: cwd, env, pty (True or (rows, cols)), timeout_ms, idempotency_key."""
        return await self.client.start_process(self.id, cmd, **options)

    async def processes(self, include_ended: bool = False) -> list[models.Process]:
        return await self.client.list_processes(self.id, include_ended)

    async def get_process(self, process_id: str) -> models.Process:
        return await self.client.get_process(self.id, process_id)

    async def write_stdin(self, process_id: str, data: str | bytes, eof: bool = False) -> int:
        return await self.client.write_stdin(self.id, process_id, data, eof)

    async def resize(self, process_id: str, rows: int, cols: int) -> None:
        await self.client.resize(self.id, process_id, rows, cols)

    async def signal_process(self, process_id: str, signal: str | int) -> None:
        await self.client.signal_process(self.id, process_id, signal)

    async def kill_process(self, process_id: str) -> models.Process:
        return await self.client.kill_process(self.id, process_id)

    async def process_output(self, process_id: str, offset: int = 0,
                             max_bytes: int | None = None) -> models.ProcessOutput:
        return await self.client.process_output(self.id, process_id, offset, max_bytes)

    def process_stream(self, process_id: str, last_event_id: str | None = None
                       ) -> AsyncIterator[models.ProcessEvent]:
        return self.client.process_stream(self.id, process_id, last_event_id)

    async def execs(self) -> list[models.ExecRecord]:
        return await self.client.list_execs(self.id)
