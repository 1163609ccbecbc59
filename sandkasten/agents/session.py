"""`SandkastenSandboxSession`: the Agents SDK's `BaseSandboxSession` on one Sandkasten session.

How each part of the SDK's contract maps onto the daemon:
- exec (the SDK's own commands: mkdir, ls, rm, probes; and exec_command on a daemon without
  the process API): one `POST /exec` in the session's persistent shell, the SDK's argv quoted
  into one command line (journaled and exported by `sandkasten audit export` exactly so); the
  daemon interrupts it at `timeout` and keeps the session usable.
- read / write under /workspace: the file API, confined on the host by the daemon
  (openat2 RESOLVE_BENEATH); elsewhere (extra path grants) through exec.
- persist / hydrate: the workspace as one tar, streamed to and from a temporary file on the
  agent's side (never in memory, never base64), packed and extracted by the daemon beneath
  /workspace (`GET/POST /fs/archive`).
- running: the session's status in the journal. shutdown: the session is destroyed (a
  persistent `workspace_id` keeps its files).
- exec_command and write_stdin: processes beside the shell, `sandkasten.agents.pty`.
- exposed ports: bridge networking only; the endpoint is the sandbox's own address, which the
  daemon's host can reach.

Errors from the daemon become the SDK's own error types (`sandkasten.agents.faults`)."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import math
import shlex
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

from agents.sandbox.errors import (
    ExecTimeoutError,
    ExecTransportError,
    ExposedPortUnavailableError,
    WorkspaceArchiveReadError,
    WorkspaceArchiveWriteError,
    WorkspaceReadNotFoundError,
)
from agents.sandbox.session.base_sandbox_session import BaseSandboxSession
from agents.sandbox.session.workspace_payloads import coerce_write_payload
from agents.sandbox.types import ExecResult, ExposedPortEndpoint, User
from agents.sandbox.workspace_paths import sandbox_path_str

from sandkasten.agents.faults import reason_of, transport_error
from sandkasten.agents.pty import ProcessTable
from sandkasten.agents.state import SandkastenSandboxSessionState
from sandkasten.client import errors as client_errors
from sandkasten.schema.vocabulary import SessionStatus

if TYPE_CHECKING:
    from sandkasten.agents.connection import Connection

WORKSPACE = "/workspace"
SMALL_WRITE = 8 << 20          # larger files go as a one-member tar (no base64 JSON body)
OUTSIDE_WRITE_MAX = 256 << 10  # files outside /workspace travel inside a command line


def inside_workspace(path: str) -> bool:
    return path == WORKSPACE or path.startswith(WORKSPACE + "/")


class SandkastenSandboxSession(ProcessTable, BaseSandboxSession):
    """One Sandkasten session (`state.sandbox_id`) behind the SDK's session interface."""

    state: SandkastenSandboxSessionState

    def __init__(self, *, state: SandkastenSandboxSessionState, connect) -> None:
        """connect(): the owning client's `Connection` (made in the running event loop)."""
        self.state = state
        self._connect = connect
        ProcessTable.__init__(self)

    @property
    def sandbox_id(self) -> str:
        return self.state.sandbox_id

    def _connection(self) -> Connection:
        return self._connect()

    # -- lifecycle ------------------------------------------------------------------
    async def _after_start(self) -> None:
        await self._probe_processes()

    async def running(self) -> bool:
        try:
            info = await self._connection().api.get_session(self.sandbox_id)
        except client_errors.SandkastenError:
            return False
        return info.status == SessionStatus.RUNNING

    async def _shutdown_backend(self) -> None:
        """Destroy the Sandkasten session (a persistent workspace keeps its files)."""
        try:
            await self._connection().api.destroy_session(self.sandbox_id)
        except (client_errors.SessionNotFound, client_errors.SessionEnded):
            pass

    # -- exec -----------------------------------------------------------------------
    async def _exec_internal(self, *command: str | Path, timeout: float | None = None) -> ExecResult:
        line = shlex.join(str(c) for c in command)
        timeout_ms = None if timeout is None else max(1, math.ceil(timeout * 1000))
        try:
            result = await self._connection().api.exec(self.sandbox_id, line, timeout_ms)
        except client_errors.SandkastenError as e:
            raise transport_error(command, e, f"run the command in Sandkasten session {self.sandbox_id}") from e
        if result.timed_out:
            raise ExecTimeoutError(command=command, timeout_s=timeout,
                                   context={"exec_id": result.exec_id, "backend": "sandkasten"})
        if result.exit_code is None:
            raise ExecTransportError(command=command, context={"exec_id": result.exec_id,
                                                               "status": result.status},
                                     message=f"the command ended without an exit code ({result.status})")
        return ExecResult(stdout=result.stdout.encode(), stderr=result.stderr.encode(),
                          exit_code=result.exit_code)

    # -- files ----------------------------------------------------------------------
    async def read(self, path: Path, *, user: str | User | None = None) -> io.IOBase:
        if user is not None:
            await self._check_read_with_exec(path, user=user)
        target = sandbox_path_str(self.normalize_path(path))
        if not inside_workspace(target):
            return io.BytesIO(await self._read_by_exec(path, target, user))
        return io.BytesIO(await self._read_by_api(path, target, None))

    async def _read_bounded(self, path: Path, *, max_bytes: int) -> bytes:
        target = sandbox_path_str(self.normalize_path(path))
        if not inside_workspace(target):
            return (await self._read_by_exec(path, target, None))[:max_bytes]
        return await self._read_by_api(path, target, max_bytes)

    async def _read_by_api(self, path: Path, target: str, max_bytes: int | None) -> bytes:
        try:
            content = await self._connection().api.read(self.sandbox_id, target, max_bytes)
        except client_errors.FileNotFound as e:
            raise WorkspaceReadNotFoundError(path=path, context=reason_of(e), cause=e) from e
        except client_errors.SandkastenError as e:
            raise WorkspaceArchiveReadError(path=path, context=reason_of(e), cause=e) from e
        if content.truncated and max_bytes is None:
            raise WorkspaceArchiveReadError(path=path, context={
                "reason": "file_too_large", "size": content.size, "backend": "sandkasten"})
        return content.content

    async def _read_by_exec(self, path: Path, target: str, user: str | User | None) -> bytes:
        command = ("sh", "-c", 'base64 < "$1"', "sh", target)
        result = await self.exec(*command, shell=False, user=user)
        if not result.ok():
            await self._raise_read_error_from_exec(path=path, workspace_path=Path(target), command=command,
                                                   result=result, user=user)
        try:
            return base64.b64decode(result.stdout, validate=False)
        except ValueError as e:
            raise WorkspaceArchiveReadError(path=path, context={"reason": "undecodable"}, cause=e) from e

    async def write(self, path: Path, data: io.IOBase, *, user: str | User | None = None) -> None:
        if user is not None:
            await self._check_write_with_exec(path, user=user)
        content = coerce_write_payload(path=path, data=data).stream.read()
        target = sandbox_path_str(self.normalize_path(path, for_write=True))
        try:
            if not inside_workspace(target):
                await self._write_by_exec(path, target, content, user)
            elif len(content) <= SMALL_WRITE:
                await self._connection().api.write(self.sandbox_id, target, content)
            else:
                with _one_file_tar(target, content) as tar:
                    await self._connection().upload_archive(self.sandbox_id, tar)
        except client_errors.SandkastenError as e:
            raise WorkspaceArchiveWriteError(path=path, context=reason_of(e), cause=e) from e

    async def _write_by_exec(self, path: Path, target: str, content: bytes, user: str | User | None) -> None:
        if len(content) > OUTSIDE_WRITE_MAX:
            raise WorkspaceArchiveWriteError(path=path, context={
                "reason": "outside_workspace_too_large", "limit": OUTSIDE_WRITE_MAX},
                message=f"unable to write {target}: files outside {WORKSPACE} travel in a command line, "
                        f"at most {OUTSIDE_WRITE_MAX} bytes")
        encoded = base64.b64encode(content).decode()
        command = ("sh", "-c", 'mkdir -p -- "$(dirname -- "$1")" && printf %s "$2" | base64 -d > "$1"',
                   "sh", target, encoded)
        result = await self.exec(*command, shell=False, user=user)
        if not result.ok():
            raise WorkspaceArchiveWriteError(path=path, context={
                "stderr": result.stderr.decode("utf-8", "replace"), "exit_code": result.exit_code})

    # -- the whole workspace ------------------------------------------------------------
    async def persist_workspace(self) -> io.IOBase:
        """The workspace as a tar in a temporary file (rewound), member names relative to it."""
        root = Path(WORKSPACE)
        sink = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller open; closed here on error
        try:
            await self._connection().download_archive(self.sandbox_id, sink)
            skip = self._persist_workspace_skip_relpaths()
            if skip:
                sink = await asyncio.to_thread(_without, sink, {p.as_posix() for p in skip})
        except client_errors.SandkastenError as e:
            sink.close()
            raise WorkspaceArchiveReadError(path=root, context=reason_of(e), cause=e) from e
        except BaseException:
            sink.close()
            raise
        return sink

    async def hydrate_workspace(self, data: io.IOBase) -> None:
        """Extract a tar into /workspace. Symlinks pointing out of it (a venv's python) are kept
        as symlinks, as persist_workspace found them; the daemon never follows one, and refuses
        absolute names, '..', members through symlinks, devices (WorkspaceArchiveWriteError)."""
        try:
            # the SDK types `data` as io.IOBase (which has no read); it hands a binary stream
            await self._connection().upload_archive(self.sandbox_id, data,  # type: ignore[arg-type]
                                                    external_symlinks=True)
        except client_errors.SandkastenError as e:
            raise WorkspaceArchiveWriteError(path=Path(WORKSPACE), context=reason_of(e), cause=e) from e

    # -- ports ------------------------------------------------------------------------
    async def _resolve_exposed_port(self, port: int) -> ExposedPortEndpoint:
        def unavailable(detail: str, cause: BaseException | None = None) -> ExposedPortUnavailableError:
            return ExposedPortUnavailableError(port=port, exposed_ports=self.state.exposed_ports,
                                               reason="backend_unavailable",
                                               context={"backend": "sandkasten", "detail": detail}, cause=cause)

        if self.state.network_mode != "bridge":
            raise unavailable("only network_mode 'bridge' gives a sandbox an address the host can reach")
        result = await self.exec("cat", "/proc/net/fib_trie", shell=False)
        address = _own_address(result.stdout.decode("utf-8", "replace")) if result.ok() else None
        if address is None:
            raise unavailable("the sandbox has no IPv4 address")
        return ExposedPortEndpoint(host=address, port=port, tls=False)


# --- pieces of one operation each ---------------------------------------------------------

def _one_file_tar(target: str, content: bytes) -> IO[bytes]:
    buf = tempfile.SpooledTemporaryFile(max_size=SMALL_WRITE)  # noqa: SIM115 - returned open; closed here on error
    try:
        info = tarfile.TarInfo(target[len(WORKSPACE) + 1:])
        info.size, info.mode, info.mtime = len(content), 0o644, int(time.time())
        with tarfile.open(fileobj=buf, mode="w|") as tar:
            tar.addfile(info, io.BytesIO(content))
        buf.seek(0)
    except BaseException:
        buf.close()
        raise
    return buf


def _without(source: IO[bytes], skip: set[str]) -> io.BufferedRandom:
    """A copy of a tar without the members at or under the `skip` paths (the manifest's
    ephemeral entries: the SDK rebuilds those on resume)."""
    out = tempfile.TemporaryFile()  # noqa: SIM115 - returned open; closed here on error
    try:
        with source, tarfile.open(fileobj=source, mode="r|") as tin, tarfile.open(fileobj=out, mode="w|") as tout:
            for member in tin:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if any(name == s or name.startswith(s + "/") for s in skip):
                    continue
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out


def _own_address(fib_trie: str) -> str | None:
    """The sandbox's IPv4 address: the `/32 host LOCAL` entry that is not loopback."""
    lines = fib_trie.splitlines()
    for i, line in enumerate(lines[1:], start=1):
        if "/32 host LOCAL" in line:
            candidate = lines[i - 1].strip().lstrip("|-+ ").strip()
            try:
                addr = ipaddress.IPv4Address(candidate)
            except ValueError:
                continue
            if not addr.is_loopback:
                return str(addr)
    return None
