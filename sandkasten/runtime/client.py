"""Clients for a runner's unix socket (protocol in `runner.protocol`): a blocking one for
the CLI, tools and tests, an asyncio one for the daemon. Both speak one request per
connection — a connect costs microseconds and a dead daemon leaves nothing half-read."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner import protocol
from sandkasten.errors import SandboxGone

CONNECT_TIMEOUT = 2.0


def _runner(sock_path: Path) -> str:
    """Named by its session (run/<sid>/runner.sock): messages reach API clients and the
    journal, which have no business with host paths."""
    return f"the runner of sandbox {Path(sock_path).parent.name}"


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


# sun_path holds 108 bytes with its NUL: a longer path (a deep data_dir) is reached through a
# descriptor of its directory, as the runner binds it by a relative name (runtime.setup)
_SUN_PATH_MAX = 107


@contextmanager
def _addressable(sock_path: Path) -> Iterator[str]:
    path = str(sock_path)
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    try:
        fd = os.open(Path(sock_path).parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxGone(f"unable to reach {_runner(sock_path)}: {_why(e)}") from None
    try:
        yield f"/proc/self/fd/{fd}/{Path(sock_path).name}"
    finally:
        os.close(fd)


def call(sock_path: Path, msg: dict, timeout: float | None = 10.0) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(CONNECT_TIMEOUT)
        try:
            with _addressable(sock_path) as address:
                s.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, socket.timeout) as e:
            raise SandboxGone(f"unable to reach {_runner(sock_path)}: {_why(e)}") from None
        s.settimeout(timeout)
        s.sendall(protocol.encode(msg))
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                raise SandboxGone(f"{_runner(sock_path)} closed the connection (sandbox died?)")
            buf += chunk
        return protocol.decode(buf)
    finally:
        s.close()


async def acall(sock_path: Path, msg: dict, timeout: float | None = 10.0, on_running=None) -> dict:
    """One request; with `on_running`, an interim `{"state": "running"}` reply is passed to it
    (awaited) and the final reply on the same connection is returned."""
    try:
        with _addressable(sock_path) as address:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(address, limit=protocol.MAX_LINE), CONNECT_TIMEOUT)
    except (FileNotFoundError, ConnectionRefusedError, asyncio.TimeoutError, OSError) as e:
        raise SandboxGone(f"unable to reach {_runner(sock_path)}: {_why(e)}") from None
    try:
        writer.write(protocol.encode(msg))
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise SandboxGone(f"{_runner(sock_path)} closed the connection (sandbox died?)")
            reply = protocol.decode(line)
            if on_running is None or reply.get("state") != "running":
                return reply
            await on_running(reply)
            on_running = None
    except (ConnectionResetError, BrokenPipeError) as e:
        raise SandboxGone(f"{_runner(sock_path)} went away: {_why(e)}") from None
    finally:
        writer.close()
