"""The blocking client: `Client` (the API) and `Sandbox` (one session, destroyed on exit).

Every call goes through `_run`, which retries with tenacity what `protocol.retryable` allows:
while the daemon restarts, calls wait for it instead of failing (exec is safe to repeat
because its Idempotency-Key is fixed per call)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import tenacity

from sandkasten.client import errors, models, protocol as p


class Client:
    """`Client(url=None, api_key=None)` reads `SANDKASTEN_URL` (default http://127.0.0.1:8080)
    and `SANDKASTEN_API_KEY`. `retry_for` is how long (seconds) to keep retrying while the
    daemon is unreachable."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 retry_for: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        self.url = p.base_url(url)
        self.retry_for = retry_for
        self._http = httpx.Client(base_url=self.url, headers=p.auth_headers(api_key), timeout=timeout,
                                  transport=transport)

    # -- plumbing -----------------------------------------------------------
    def _retrying(self, idempotent: bool) -> tenacity.Retrying:
        return tenacity.Retrying(retry=tenacity.retry_if_exception(p.retryable(idempotent)),
                                 stop=tenacity.stop_after_delay(self.retry_for),
                                 wait=tenacity.wait_exponential(multiplier=0.05, max=1.0), reraise=True)

    def _run[T](self, call: p.Call[T]) -> T:
        try:
            for attempt in self._retrying(call.idempotent):
                with attempt:
                    response = self._http.request(
                        call.method, call.path, params=call.params, json=call.json, files=call.files,
                        data=call.data, headers=dict(call.headers),
                        timeout=httpx.USE_CLIENT_DEFAULT if call.timeout is None else call.timeout)
                    return p.decode_answer(call, response)
        except httpx.TransportError as e:
            raise p.unreachable(self.url, e) from e
        raise AssertionError("unreachable")  # tenacity either returns or reraises

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions -----------------------------------------------------------
    def create_session(self, image: str | None = None, **options: Any) -> models.Session:
        """options: workspace_id, ttl_seconds, cpu_limit, mem_limit_mb, pids_limit, env,
        network_mode, readonly_rootfs."""
        return self._run(p.create_session(image, **options))

    def get_session(self, session_id: str) -> models.Session:
        return self._run(p.get_session(session_id))

    def list_sessions(self, include_ended: bool = False) -> list[models.Session]:
        return self._run(p.list_sessions(include_ended))

    def destroy_session(self, session_id: str) -> None:
        self._run(p.destroy_session(session_id))

    def stats(self, session_id: str) -> models.Stats:
        return self._run(p.stats(session_id))

    def session(self, image: str | None = None, **options: Any) -> Sandbox:
        """A new session as a context manager: `with client.session() as sb: sb.exec("ls")`."""
        return Sandbox(self, self.create_session(image, **options))

    def attach(self, session_id: str) -> Sandbox:
        return Sandbox(self, self.get_session(session_id))

    # -- execs ----------------------------------------------------------------
    def exec(self, session_id: str, cmd: str, timeout_ms: int | None = None, *,
             raise_on_timeout: bool = False, idempotency_key: str | None = None) -> models.ExecResult:
        """Run `cmd` in the session's persistent shell. One Idempotency-Key per call (yours, or a
        fresh one) is reused by every retry, so the command runs once."""
        result = self._run(p.exec_(session_id, cmd, timeout_ms, idempotency_key))
        if raise_on_timeout and result.timed_out:
            raise errors.CommandTimeout(f"command timed out after {result.duration_ms} ms: {cmd[:80]}",
                                        status=504, details={"exec_id": result.exec_id})
        return result

    def exec_stream(self, session_id: str, cmd: str, timeout_ms: int | None = None
                    ) -> Iterator[models.ExecEvent]:
        """Yields `ExecChunk`s as output arrives, then one `ExecDone`. A dropped connection is
        resumed with `Last-Event-ID` (nothing lost, nothing repeated); an `error` event raises."""
        yield from self._follow(p.ExecStreamState(session_id, cmd, timeout_ms))

    def _follow(self, state: p.StreamState[Any]) -> Iterator[Any]:
        """Events of one stream, reconnecting with `Last-Event-ID` until its final event."""
        patience = p.Patience(self.retry_for)
        while not state.done:
            try:
                for event in self._stream_once(state):
                    patience.progress()
                    yield event
                if not state.done:
                    raise httpx.RemoteProtocolError("the stream ended before its final event")
            except (httpx.TransportError, errors.NotReady) as e:
                delay = patience.next_delay(e)
                if delay is None:
                    raise p.unreachable(self.url, e) from e
                time.sleep(delay)

    def _stream_once(self, state: p.StreamState[Any]) -> Iterator[Any]:
        with self._http.stream(**state.request()) as response:
            if response.status_code >= 400:
                response.read()
                raise p.error_of(response)
            state.opened(response)
            for line in response.iter_lines():
                event = state.feed(line)
                if event is not None:
                    yield event
                if state.done:
                    return
            state.feed("")  # a final event without its blank line

    def list_execs(self, session_id: str) -> list[models.ExecRecord]:
        return self._run(p.list_execs(session_id))

    # -- processes beside the shell --------------------------------------------
    def start_process(self, session_id: str, cmd: str, *, cwd: str | None = None,
                      env: Mapping[str, str] | None = None, pty: Any = None, timeout_ms: int | None = None,
                      idempotency_key: str | None = None) -> models.Process:
        """Start `cmd` beside the shell (a server, a watcher, a REPL); `pty=True` or (rows, cols)
        gives it a terminal. It runs until it exits, is killed, or the session ends."""
        return self._run(p.start_process(session_id, cmd, cwd=cwd, env=env, pty=pty, timeout_ms=timeout_ms,
                                         idempotency_key=idempotency_key))

    def list_processes(self, session_id: str, include_ended: bool = False) -> list[models.Process]:
        return self._run(p.list_processes(session_id, include_ended))

    def get_process(self, session_id: str, process_id: str) -> models.Process:
        return self._run(p.get_process(session_id, process_id))

    def write_stdin(self, session_id: str, process_id: str, data: str | bytes, eof: bool = False) -> int:
        return self._run(p.write_stdin(session_id, process_id, data, eof))

    def resize(self, session_id: str, process_id: str, rows: int, cols: int) -> None:
        self._run(p.resize(session_id, process_id, rows, cols))

    def signal_process(self, session_id: str, process_id: str, signal: str | int) -> None:
        self._run(p.signal_process(session_id, process_id, signal))

    def kill_process(self, session_id: str, process_id: str) -> models.Process:
        return self._run(p.kill_process(session_id, process_id))

    def process_output(self, session_id: str, process_id: str, offset: int = 0,
                       max_bytes: int | None = None) -> models.ProcessOutput:
        return self._run(p.process_output(session_id, process_id, offset, max_bytes))

    def process_stream(self, session_id: str, process_id: str, last_event_id: str | None = None
                       ) -> Iterator[models.ProcessEvent]:
        """Yields `ExecChunk`s of its output (from the start, or after `last_event_id`), then a
        `ProcessDone` when it ends; reconnects and resumes across daemon restarts."""
        yield from self._follow(p.ProcessStreamState(session_id, process_id, last_event_id))

    def get_exec(self, session_id: str, exec_id: str) -> models.ExecResult:
        return self._run(p.get_exec(session_id, exec_id))

    # -- files in a session's /workspace ---------------------------------------------
    def write(self, session_id: str, path: str, content: str | bytes) -> models.FileEntry:
        return self._run(p.write(path, content, session_id=session_id))

    def upload(self, session_id: str, files: Mapping[str, bytes], directory: str = "/workspace"
               ) -> list[models.FileEntry]:
        """Upload {name: bytes} into `directory` (multipart, binary-safe)."""
        return self._run(p.upload(files, directory, session_id=session_id))

    def read(self, session_id: str, path: str, max_bytes: int | None = None) -> models.FileContent:
        return self._run(p.read(path, max_bytes, session_id=session_id))

    def list_files(self, session_id: str, path: str = "", recursive: bool = False) -> list[models.FileEntry]:
        return self._run(p.list_files(path, recursive, session_id=session_id))

    def exists(self, session_id: str, path: str) -> bool:
        split = p.split_parent(path)
        if split is None:
            return True
        parent, name = split
        try:
            return any(e.name == name for e in self.list_files(session_id, parent))
        except errors.SandkastenError as e:
            if p.missing_parent(e):
                return False
            raise

    def delete(self, session_id: str, path: str, recursive: bool = False) -> None:
        self._run(p.delete(path, recursive, session_id=session_id))

    # -- workspaces (files persist across sessions) ----------------------------------------
    def list_workspaces(self) -> list[models.Workspace]:
        return self._run(p.list_workspaces())

    def delete_workspace(self, workspace_id: str, force: bool = False) -> None:
        self._run(p.delete_workspace(workspace_id, force))

    def workspace_write(self, workspace_id: str, path: str, content: str | bytes) -> models.FileEntry:
        return self._run(p.write(path, content, workspace_id=workspace_id))

    def workspace_upload(self, workspace_id: str, files: Mapping[str, bytes], directory: str = "/workspace"
                         ) -> list[models.FileEntry]:
        return self._run(p.upload(files, directory, workspace_id=workspace_id))

    def workspace_read(self, workspace_id: str, path: str, max_bytes: int | None = None) -> models.FileContent:
        return self._run(p.read(path, max_bytes, workspace_id=workspace_id))

    def workspace_list(self, workspace_id: str, path: str = "", recursive: bool = False
                       ) -> list[models.FileEntry]:
        return self._run(p.list_files(path, recursive, workspace_id=workspace_id))

    def health(self) -> dict:
        return self._run(p.health())


class Sandbox:
    """One live session bound to its client. Used as a context manager it destroys the session
    on exit (also when the block raises)."""

    def __init__(self, client: Client, info: models.Session) -> None:
        self.client, self.info = client, info

    @property
    def id(self) -> str:
        return self.info.id

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self.destroy()
        except errors.SandkastenError as e:
            if exc is None:
                raise
            exc.add_note(p.destroy_failed_note(self.id, e))  # the block's own error stays the one raised

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, image={self.info.image!r}, status={self.info.status!r})"

    def refresh(self) -> models.Session:
        self.info = self.client.get_session(self.id)
        return self.info

    def destroy(self) -> None:
        try:
            self.client.destroy_session(self.id)
        except errors.SessionNotFound:
            pass

    def exec(self, cmd: str, timeout_ms: int | None = None, *, raise_on_timeout: bool = False,
             idempotency_key: str | None = None) -> models.ExecResult:
        return self.client.exec(self.id, cmd, timeout_ms, raise_on_timeout=raise_on_timeout,
                                idempotency_key=idempotency_key)

    def exec_stream(self, cmd: str, timeout_ms: int | None = None) -> Iterator[models.ExecEvent]:
        return self.client.exec_stream(self.id, cmd, timeout_ms)

    def write(self, path: str, content: str | bytes) -> models.FileEntry:
        return self.client.write(self.id, path, content)

    def upload(self, files: Mapping[str, bytes], directory: str = "/workspace") -> list[models.FileEntry]:
        return self.client.upload(self.id, files, directory)

    def read(self, path: str, max_bytes: int | None = None) -> models.FileContent:
        return self.client.read(self.id, path, max_bytes)

    def list_files(self, path: str = "", recursive: bool = False) -> list[models.FileEntry]:
        return self.client.list_files(self.id, path, recursive)

    def exists(self, path: str) -> bool:
        return self.client.exists(self.id, path)

    def delete(self, path: str, recursive: bool = False) -> None:
        self.client.delete(self.id, path, recursive)

    def stats(self) -> models.Stats:
        return self.client.stats(self.id)

    def start_process(self, cmd: str, **options: Any) -> models.Process:
        """options: cwd, env, pty (True or (rows, cols)), timeout_ms, idempotency_key."""
        return self.client.start_process(self.id, cmd, **options)

    def processes(self, include_ended: bool = False) -> list[models.Process]:
        return self.client.list_processes(self.id, include_ended)

    def get_process(self, process_id: str) -> models.Process:
        return self.client.get_process(self.id, process_id)

    def write_stdin(self, process_id: str, data: str | bytes, eof: bool = False) -> int:
        return self.client.write_stdin(self.id, process_id, data, eof)

    def resize(self, process_id: str, rows: int, cols: int) -> None:
        self.client.resize(self.id, process_id, rows, cols)

    def signal_process(self, process_id: str, signal: str | int) -> None:
        self.client.signal_process(self.id, process_id, signal)

    def kill_process(self, process_id: str) -> models.Process:
        return self.client.kill_process(self.id, process_id)

    def process_output(self, process_id: str, offset: int = 0, max_bytes: int | None = None) -> models.ProcessOutput:
        return self.client.process_output(self.id, process_id, offset, max_bytes)

    def process_stream(self, process_id: str, last_event_id: str | None = None) -> Iterator[models.ProcessEvent]:
        return self.client.process_stream(self.id, process_id, last_event_id)

    def execs(self) -> list[models.ExecRecord]:
        return self.client.list_execs(self.id)
