"""The HTTP API as data: each call is a `Call` (method, path, body, how to decode the answer,
whether a retry after a dropped connection is safe). The sync and async clients only do the
I/O, so both speak exactly the same protocol. Also the exec-stream state that survives
reconnects. Pure: no I/O here."""

from __future__ import annotations

import json as jsonlib
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

import httpx

from sandkasten.client import errors, models, sse
from sandkasten.schema import requests as rq
from sandkasten.schema.vocabulary import NetworkMode

DEFAULT_URL = "http://127.0.0.1:8080"
# Only these two: the daemon reads every other SANDKASTEN_* variable as a config override
# (sandkasten/config.py skips SANDKASTEN_URL; SANDKASTEN_API_KEY is its api_key — the same value).
URL_ENV, KEY_ENV = "SANDKASTEN_URL", "SANDKASTEN_API_KEY"
MARGIN_S = 30.0  # an exec's HTTP read timeout is its command timeout plus this
SERVER_EXEC_TIMEOUT_MS = 600_000  # the daemon's largest max_exec_timeout_ms default


def base_url(url: str | None) -> str:
    """The daemon's base URL: `url`, else SANDKASTEN_URL, else the default. A bare host:port
    (`127.0.0.1:8080`, as in curl) means http; anything else that is not an http(s) URL with a
    host is an `InvalidURL` now, not an obscure transport error at the first request."""
    given = url or os.environ.get(URL_ENV) or DEFAULT_URL
    source = "" if url else f" (from {URL_ENV})" if os.environ.get(URL_ENV) else ""
    text = given.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parsed = httpx.URL(text)
        problem = ("the scheme must be http or https" if parsed.scheme not in ("http", "https")
                   else "it names no host" if not parsed.host
                   else f"port {parsed.port} is out of range" if parsed.port is not None and not 0 < parsed.port < 65536
                   else "")
    except httpx.InvalidURL as e:
        problem = str(e)
    if problem:
        raise errors.InvalidURL(f"invalid Sandkasten daemon URL {given!r}{source}: {problem} "
                                f"(expected e.g. {DEFAULT_URL})", details={"url": given})
    return text.rstrip("/")


def auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(KEY_ENV, "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def new_idempotency_key() -> str:
    return "sk-client-" + secrets.token_hex(12)


@dataclass(frozen=True)
class Call[T]:
    method: str
    path: str
    decode: Callable[[Any], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    files: Any = None
    data: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # True when sending it twice has the effect of sending it once (GET, DELETE, exec with an
    # Idempotency-Key, overwriting a file): then a connection dropped mid-request is retried too.
    idempotent: bool = True
    timeout: float | None = None  # read timeout; None: the client's default


def _sid(session_id: str) -> str:
    return quote(session_id, safe="")


def _ok(_: Any) -> None:
    return None


# ------------------------------------------------------------------ sessions
def create_session(image: str | None = None, *, workspace_id: str | None = None, ttl_seconds: int | None = None,
                   cpu_limit: float | None = None, mem_limit_mb: int | None = None,
                   pids_limit: int | None = None, env: Mapping[str, str] | None = None,
                   network_mode: str | None = None, readonly_rootfs: bool | None = None) -> Call[models.Session]:
    body = rq.CreateSession(image=image, workspace_id=workspace_id, ttl_seconds=ttl_seconds, cpu_limit=cpu_limit,
                            mem_limit_mb=mem_limit_mb, pids_limit=pids_limit, env=dict(env) if env else None,
                            network_mode=cast(NetworkMode | None, network_mode),   # the daemon judges it
                            readonly_rootfs=readonly_rootfs).body()
    # Not idempotent: a retry after the request went out could make a second session.
    return Call("POST", "/v1/sessions", models.Session.from_json, json=body, idempotent=False)


def get_session(session_id: str) -> Call[models.Session]:
    return Call("GET", f"/v1/sessions/{_sid(session_id)}", models.Session.from_json)


def list_sessions(include_ended: bool = False) -> Call[list[models.Session]]:
    return Call("GET", "/v1/sessions", lambda rows: [models.Session.from_json(r) for r in rows],
                params={"all": "true"} if include_ended else None)


def destroy_session(session_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/sessions/{_sid(session_id)}", _ok)


def stats(session_id: str) -> Call[models.Stats]:
    return Call("GET", f"/v1/sessions/{_sid(session_id)}/stats", models.Stats.from_json)


# ------------------------------------------------------------------ execs
def exec_body(cmd: str, timeout_ms: int | None) -> dict[str, Any]:
    return rq.Exec(cmd=cmd, timeout_ms=timeout_ms).body()


def read_timeout(timeout_ms: int | None) -> float:
    return (timeout_ms or SERVER_EXEC_TIMEOUT_MS) / 1000 + MARGIN_S


def exec_(session_id: str, cmd: str, timeout_ms: int | None = None,
          idempotency_key: str | None = None) -> Call[models.ExecResult]:
    """One key per call, made here and reused by every retry of this Call: the daemon then
    runs the command once however often the request reaches it."""
    key = idempotency_key or new_idempotency_key()
    return Call("POST", f"/v1/sessions/{_sid(session_id)}/exec", models.ExecResult.from_json,
                json=exec_body(cmd, timeout_ms), headers={"Idempotency-Key": key},
                timeout=read_timeout(timeout_ms))


def list_execs(session_id: str) -> Call[list[models.ExecRecord]]:
    return Call("GET", f"/v1/sessions/{_sid(session_id)}/execs",
                lambda rows: [models.ExecRecord.from_json(r) for r in rows])


def get_exec(session_id: str, exec_id: str) -> Call[models.ExecResult]:
    return Call("GET", f"/v1/sessions/{_sid(session_id)}/execs/{quote(exec_id, safe='')}",
                models.ExecResult.from_json)


# ------------------------------------------------------------------ processes
def _proc(session_id: str, process_id: str | None = None) -> str:
    base = f"/v1/sessions/{_sid(session_id)}/processes"
    return base if process_id is None else f"{base}/{quote(process_id, safe='')}"


def _terminal(pty: bool | tuple[int, int] | Mapping[str, int] | None) -> rq.Terminal | None:
    if pty is None or pty is False:
        return None
    if pty is True:
        return rq.Terminal(rows=24, cols=80)
    if isinstance(pty, tuple):
        return rq.Terminal(rows=pty[0], cols=pty[1])
    return rq.Terminal(**pty)


def start_process(session_id: str, cmd: str, *, cwd: str | None = None, env: Mapping[str, str] | None = None,
                  pty: bool | tuple[int, int] | Mapping[str, int] | None = None, timeout_ms: int | None = None,
                  idempotency_key: str | None = None) -> Call[models.Process]:
    """One Idempotency-Key per call: a retry reaches the process the first attempt started."""
    body = rq.StartProcess(cmd=cmd, cwd=cwd, env=dict(env) if env else None, pty=_terminal(pty),
                           timeout_ms=timeout_ms).body()
    return Call("POST", _proc(session_id), models.Process.from_json, json=body,
                headers={"Idempotency-Key": idempotency_key or new_idempotency_key()})


def list_processes(session_id: str, include_ended: bool = False) -> Call[list[models.Process]]:
    return Call("GET", _proc(session_id), lambda rows: [models.Process.from_json(r) for r in rows],
                params={"all": "true"} if include_ended else None)


def get_process(session_id: str, process_id: str) -> Call[models.Process]:
    return Call("GET", _proc(session_id, process_id), models.Process.from_json)


def write_stdin(session_id: str, process_id: str, data: str | bytes, eof: bool = False,
                idempotency_key: str | None = None) -> Call[int]:
    """One Idempotency-Key per call: a retry after a dropped connection types nothing twice."""
    import base64
    body = (rq.Stdin(data=data) if isinstance(data, str) else rq.Stdin(data_base64=base64.b64encode(data).decode()))
    body.eof = eof or None
    return Call("POST", _proc(session_id, process_id) + "/stdin", lambda b: int(b.get("bytes", 0)), json=body.body(),
                headers={"Idempotency-Key": idempotency_key or new_idempotency_key()})


def resize(session_id: str, process_id: str, rows: int, cols: int) -> Call[None]:
    return Call("POST", _proc(session_id, process_id) + "/resize", _ok, json=rq.Resize(rows=rows, cols=cols).body())


def signal_process(session_id: str, process_id: str, signal: str | int) -> Call[None]:
    return Call("POST", _proc(session_id, process_id) + "/signal", _ok, json=rq.Signal(signal=signal).body())


def kill_process(session_id: str, process_id: str) -> Call[models.Process]:
    return Call("DELETE", _proc(session_id, process_id), models.Process.from_json)


def process_output(session_id: str, process_id: str, offset: int = 0,
                   max_bytes: int | None = None) -> Call[models.ProcessOutput]:
    params: dict[str, Any] = {"offset": offset}
    if max_bytes is not None:
        params["max_bytes"] = max_bytes
    return Call("GET", _proc(session_id, process_id) + "/output", models.ProcessOutput.from_json, params=params)


# ------------------------------------------------------------------ files (session or workspace)
def _fs_root(session_id: str | None, workspace_id: str | None) -> str:
    if (session_id is None) == (workspace_id is None):
        raise ValueError("give exactly one of session_id and workspace_id")
    if session_id is not None:
        return f"/v1/sessions/{_sid(session_id)}/fs"
    return f"/v1/workspaces/{quote(workspace_id or '', safe='')}/fs"


def write(path: str, content: str | bytes, *, session_id: str | None = None,
          workspace_id: str | None = None) -> Call[models.FileEntry]:
    import base64
    body = (rq.WriteFile(path=path, text=content) if isinstance(content, str)
            else rq.WriteFile(path=path, content_base64=base64.b64encode(content).decode())).body()
    return Call("POST", _fs_root(session_id, workspace_id) + "/write", models.FileEntry.from_json, json=body)


def upload(files: Mapping[str, bytes], directory: str = "/workspace", *, session_id: str | None = None,
           workspace_id: str | None = None) -> Call[list[models.FileEntry]]:
    """multipart/form-data: one file part per name (a plain name), placed in the form field `dir`."""
    parts = [("file", (name, content, "application/octet-stream")) for name, content in files.items()]
    return Call("POST", _fs_root(session_id, workspace_id) + "/upload", _entries, files=parts,
                data={"dir": directory})


def read(path: str, max_bytes: int | None = None, *, session_id: str | None = None,
         workspace_id: str | None = None) -> Call[models.FileContent]:
    params: dict[str, Any] = {"path": path}
    if max_bytes is not None:
        params["max_bytes"] = max_bytes
    return Call("GET", _fs_root(session_id, workspace_id) + "/read", models.FileContent.from_json, params=params)


def list_files(path: str = "", recursive: bool = False, *, session_id: str | None = None,
               workspace_id: str | None = None) -> Call[list[models.FileEntry]]:
    params: dict[str, Any] = {"path": path}
    if recursive:
        params["recursive"] = "true"
    return Call("GET", _fs_root(session_id, workspace_id), _entries, params=params)


def _entries(body: Any) -> list[models.FileEntry]:
    rows = body.get("entries", []) if isinstance(body, dict) else body
    return [models.FileEntry.from_json(r) for r in rows]


def delete(path: str, recursive: bool = False, *, session_id: str | None = None,
           workspace_id: str | None = None) -> Call[None]:
    params: dict[str, Any] = {"path": path}
    if recursive:
        params["recursive"] = "true"
    return Call("DELETE", _fs_root(session_id, workspace_id), _ok, params=params)


def split_parent(path: str) -> tuple[str, str] | None:
    """`exists` lists the parent and looks for the name: works for files and directories.
    None for /workspace itself ("", ".", "/workspace/"), which always exists."""
    clean = path.strip().rstrip("/")
    while clean.startswith("./"):
        clean = clean[2:]
    if clean in ("", ".", "/workspace"):
        return None
    parent, _, name = clean.rpartition("/")
    return parent, name


def missing_parent(exc: errors.SandkastenError) -> bool:
    """The parent `exists` listed is absent or a file: then the path does not exist either."""
    return isinstance(exc, errors.FileNotFound) or (
        type(exc) is errors.InvalidRequest and exc.details.get("errno") == "ENOTDIR")


def destroy_failed_note(session_id: str, exc: BaseException) -> str:
    return f"destroying sandbox session {session_id} on exit failed too: {exc}"


# ------------------------------------------------------------------ workspaces
def list_workspaces() -> Call[list[models.Workspace]]:
    def decode(body: Any) -> list[models.Workspace]:
        rows = body.get("workspaces", []) if isinstance(body, dict) else body
        return [models.Workspace.from_json(r) for r in rows]
    return Call("GET", "/v1/workspaces", decode)


def delete_workspace(workspace_id: str, force: bool = False) -> Call[None]:
    """`force` also destroys the sessions using it (otherwise: WorkspaceInUse)."""
    return Call("DELETE", f"/v1/workspaces/{quote(workspace_id, safe='')}", _ok,
                params={"force": "true"} if force else None)


def health() -> Call[dict]:
    return Call("GET", "/healthz", lambda body: body)


# ------------------------------------------------------------------ answers and retries
def decode_answer[T](call: Call[T], response: httpx.Response) -> T:
    """The call's result, or the typed error for a non-2xx answer."""
    if response.status_code >= 400:
        raise error_of(response)
    if not response.content:
        return call.decode(None)
    return call.decode(response.json())


def error_of(response: httpx.Response) -> errors.SandkastenError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return errors.from_response(response.status_code, body, response.headers.get("x-request-id"))


NOTHING_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
DROPPED = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


def retryable(call_idempotent: bool) -> Callable[[BaseException], bool]:
    """What a retry covers: a refused connection (the daemon is restarting) always; a connection
    dropped mid-request only when repeating the call is harmless; a daemon still starting up."""
    def check(exc: BaseException) -> bool:
        if isinstance(exc, (*NOTHING_SENT, errors.NotReady)):
            return True
        return call_idempotent and isinstance(exc, DROPPED)
    return check


def unreachable(url: str, exc: BaseException) -> errors.DaemonUnreachable:
    return errors.DaemonUnreachable(f"unable to reach the Sandkasten daemon at {url}: "
                                    f"{type(exc).__name__}: {exc or 'connection failed'}")


# ------------------------------------------------------------------ exec and process streams
class StreamState[E]:
    """What following one stream of events `E` across reconnects needs: the SSE decoder (it
    keeps the last event id, sent back as `Last-Event-ID`) and whether the final event came."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.decoder = sse.Decoder()
        self.done = False

    def request(self) -> dict[str, Any]:
        """Keyword arguments for `httpx.Client.stream` for the next (re)connect."""
        raise NotImplementedError

    def opened(self, response: httpx.Response) -> None:
        """The answer to `request` arrived (its headers may name what the stream follows)."""

    def feed(self, line: str) -> E | None:
        """One line of the stream: the event it completes, if any."""
        raise NotImplementedError


class ExecStreamState(StreamState[models.ExecEvent]):
    """Everything needed to resume one streamed exec: its Idempotency-Key, its exec id once the
    daemon told it, and the last event id seen."""

    def __init__(self, session_id: str, cmd: str, timeout_ms: int | None) -> None:
        super().__init__(session_id)
        self.cmd, self.timeout_ms = cmd, timeout_ms
        self.key = new_idempotency_key()
        self.exec_id: str | None = None

    def request(self) -> dict[str, Any]:
        """Keyword arguments for `httpx.Client.stream` for the next (re)connect."""
        headers = {"Accept": "text/event-stream", "Idempotency-Key": self.key}
        if self.decoder.last_id is not None:
            headers["Last-Event-ID"] = self.decoder.last_id
        timeout = httpx.Timeout(30.0, read=read_timeout(self.timeout_ms))
        if self.exec_id:
            return dict(method="GET", url=f"/v1/sessions/{_sid(self.session_id)}/execs/"
                        f"{quote(self.exec_id, safe='')}/stream", headers=headers, timeout=timeout)
        # Before the exec id is known a reconnect repeats the POST with the same key: the daemon
        # attaches it to the exec it already started instead of running the command again.
        return dict(method="POST", url=f"/v1/sessions/{_sid(self.session_id)}/exec/stream",
                    json=exec_body(self.cmd, self.timeout_ms), headers=headers, timeout=timeout)

    def opened(self, response: httpx.Response) -> None:
        exec_id = response.headers.get("x-exec-id") or response.headers.get("exec-id")
        if exec_id:
            self.exec_id = exec_id

    def feed(self, line: str) -> models.ExecEvent | None:
        event = self.decoder.feed(line)
        if event is None:
            return None
        try:
            data = jsonlib.loads(event.data)
        except ValueError:
            raise errors.StreamBroken(f"unable to decode exec stream event {event.event!r}: "
                                      f"not JSON: {event.data[:200]!r}") from None
        if not isinstance(data, dict):
            data = {"chunk": str(data)}
        if isinstance(data.get("exec_id"), str):
            self.exec_id = data["exec_id"]
        if event.event == "chunk":
            return models.ExecChunk.from_json(data, event_id=event.id)
        if event.event == "done":
            self.done = True
            return models.ExecDone.from_json(data, event_id=event.id, exec_id=self.exec_id)
        if event.event == "error":
            self.done = True
            raise errors.from_response(0, {"error_code": data.get("error_code") or "INTERNAL",
                                           "message": data.get("message") or "exec stream failed",
                                           "details": data.get("details") or {}})
        return None  # an event kind this client does not know: skip it


class ProcessStreamState(StreamState[models.ProcessEvent]):
    """Everything needed to resume watching one process: its ids and the last event id."""

    def __init__(self, session_id: str, process_id: str, last_event_id: str | None = None) -> None:
        super().__init__(session_id)
        self.process_id = process_id
        self.decoder.last_id = last_event_id

    def request(self) -> dict[str, Any]:
        headers = {"Accept": "text/event-stream"}
        if self.decoder.last_id is not None:
            headers["Last-Event-ID"] = self.decoder.last_id
        return dict(method="GET", url=_proc(self.session_id, self.process_id) + "/stream", headers=headers,
                    timeout=httpx.Timeout(30.0, read=None))

    def feed(self, line: str) -> models.ProcessEvent | None:
        event = self.decoder.feed(line)
        if event is None or event.event not in ("chunk", "done", "error"):
            return None
        try:
            data = jsonlib.loads(event.data)
        except ValueError:
            raise errors.StreamBroken(f"unable to decode process stream event {event.event!r}: "
                                      f"not JSON: {event.data[:200]!r}") from None
        if event.event == "chunk":
            return models.ExecChunk.from_json(data, event_id=event.id)
        self.done = True
        if event.event == "done":
            return models.ProcessDone.from_json(data, event_id=event.id)
        raise errors.from_response(0, {"error_code": data.get("error_code") or "INTERNAL",
                                       "message": data.get("message") or "process stream failed",
                                       "details": data.get("details") or {}})


class Patience:
    """How long a stream keeps reconnecting: up to `budget` seconds without progress, with
    exponential backoff; any event received starts the budget again. (A plain call uses
    tenacity instead; a stream must not count the time spent reading output.)"""

    def __init__(self, budget: float, first: float = 0.05, cap: float = 1.0) -> None:
        self.budget, self.first, self.cap = budget, first, cap
        self._since = time.monotonic()
        self._delay = first

    def progress(self) -> None:
        self._since = time.monotonic()
        self._delay = self.first

    def next_delay(self, exc: BaseException) -> float | None:
        """Seconds to wait before reconnecting, or None to give up."""
        if time.monotonic() - self._since > self.budget:
            return None
        delay, self._delay = self._delay, min(self._delay * 2, self.cap)
        return delay
