"""Clients for a runner's unix socket (protocol in `runner.protocol`): a blocking one for
the CLI, tools and tests (one request per connection — a dead caller leaves nothing
half-read), and an asyncio one for the daemon that keeps its connections.

The daemon's connections (`acall`): the runner answers requests on one connection in order,
so a connection carries one request at a time and goes back to a small per-sandbox pool when
its answer has arrived — the next call skips connect and accept. A connection whose request
failed or timed out is closed, never reused; one the runner closed (it died, the sandbox was
destroyed) drops out of the pool by itself. Each connection is a plain `asyncio.Protocol`:
a line from the runner resolves the waiting call directly, without a stream reader.
"""

from __future__ import annotations

import asyncio
import os
import socket
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from runner import protocol
from sandkasten.errors import SandboxGone

CONNECT_TIMEOUT = 2.0
IDLE_PER_SANDBOX = 2        # idle connections kept per runner socket
IDLE_TOTAL = 1024           # ... and for all of them together (the oldest idle one is closed first)


def _runner(sock_path: Path | str) -> str:
    """Named by its session (run/<sid>/runner.sock): messages reach API clients and the
    journal, which have no business with host paths."""
    return f"the runner of sandbox {Path(sock_path).parent.name}"


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


# sun_path holds 108 bytes with its NUL: a longer path (a deep data_dir) is reached through a
# descriptor of its directory, as the runner binds it by a relative name (runtime.setup)
_SUN_PATH_MAX = 107


@contextmanager
def _addressable(sock_path: Path | str) -> Iterator[str]:
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
        except (TimeoutError, FileNotFoundError, ConnectionRefusedError) as e:
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


class _Link(asyncio.Protocol):
    """One connection to a runner: send a line, wait for lines back."""

    def __init__(self, path: str, pool: _Pool) -> None:
        self.path, self.pool = path, pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.lines: list[bytes] = []
        self.waiter: asyncio.Future | None = None
        self.closed: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # a unix stream connection (`_connect`)

    def send(self, data: bytes) -> None:
        if self.transport is None:
            raise ConnectionResetError("not connected")
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > protocol.MAX_LINE:
            self.close()
            return
        while True:
            end = self.buf.find(b"\n")
            if end < 0:
                break
            self.lines.append(bytes(self.buf[:end + 1]))
            del self.buf[:end + 1]
        if self.lines and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = exc or ConnectionResetError("closed")
        self.pool.discard(self)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def line(self, timeout: float | None) -> bytes:
        """The next line from the runner; b"" once it closed the connection."""
        if not self.lines and self.closed is None:
            loop = asyncio.get_running_loop()
            self.waiter = loop.create_future()
            timer = loop.call_later(timeout, self.waiter.cancel) if timeout is not None else None
            try:
                await self.waiter
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self.waiter.cancelled() and not (task is not None and task.cancelling()):
                    raise TimeoutError from None
                raise
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()
        return self.lines.pop(0) if self.lines else b""

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Pool:
    """Idle connections of one event loop, by socket path; the oldest is closed first when
    there are too many."""

    def __init__(self) -> None:
        self.by_path: dict[str, list[_Link]] = {}
        self.order: OrderedDict[_Link, None] = OrderedDict()

    def take(self, path: str) -> _Link | None:
        links = self.by_path.get(path)
        while links:
            link = links.pop()
            self.order.pop(link, None)
            if not links:
                del self.by_path[path]
            if link.closed is None and not link.lines and not link.buf:
                return link
            link.close()
        return None

    def give(self, link: _Link) -> None:
        links = self.by_path.setdefault(link.path, [])
        if link.closed is not None or link.lines or link.buf or len(links) >= IDLE_PER_SANDBOX:
            if not links:
                del self.by_path[link.path]
            link.close()
            return
        links.append(link)
        self.order[link] = None
        while len(self.order) > IDLE_TOTAL:
            oldest = next(iter(self.order))
            self.discard(oldest)
            oldest.close()

    def discard(self, link: _Link) -> None:
        if link in self.order:
            del self.order[link]
            links = self.by_path[link.path]
            links.remove(link)
            if not links:
                del self.by_path[link.path]

    def close_all(self) -> None:
        for link in list(self.order):
            self.discard(link)
            link.close()


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pool] = weakref.WeakKeyDictionary()


def _pool_of(loop: asyncio.AbstractEventLoop) -> _Pool:
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = _Pool()
    return pool


def close_idle() -> None:
    """Close the idle connections of this event loop (the daemon stopping)."""
    _pool_of(asyncio.get_running_loop()).close_all()


async def _connect(path: str, pool: _Pool) -> _Link:
    loop = asyncio.get_running_loop()
    try:
        with _addressable(path) as address:
            _, link = await asyncio.wait_for(loop.create_unix_connection(lambda: _Link(path, pool), address),
                                             CONNECT_TIMEOUT)
    except (TimeoutError, FileNotFoundError, ConnectionRefusedError, OSError) as e:
        raise SandboxGone(f"unable to reach {_runner(path)}: {_why(e)}") from None
    return link


async def acall(sock_path: Path | str, msg: dict, timeout: float | None = 10.0,
                on_running: Callable[[dict], Awaitable[Any] | None] | None = None) -> dict:
    """One request; with `on_running`, an interim `{"state": "running"}` reply is passed to it
    (awaited when it returns an awaitable) and the final reply on the same connection is
    returned."""
    path = str(sock_path)
    pool = _pool_of(asyncio.get_running_loop())
    link = pool.take(path) or await _connect(path, pool)
    clean = False
    try:
        try:
            link.send(protocol.encode(msg))
        except (ConnectionResetError, BrokenPipeError, OSError) as e:
            raise SandboxGone(f"{_runner(path)} went away: {_why(e)}") from None
        while True:
            line = await link.line(timeout)
            if not line:
                why = f": {_why(link.closed)}" if isinstance(link.closed, OSError) else " (sandbox died?)"
                raise SandboxGone(f"{_runner(path)} closed the connection{why}")
            reply = protocol.decode(line)
            if on_running is None or reply.get("state") != "running":
                clean = True
                return reply
            pending = on_running(reply)
            on_running = None
            if pending is not None:
                await pending
    finally:
        if clean:
            pool.give(link)
        else:
            link.close()
