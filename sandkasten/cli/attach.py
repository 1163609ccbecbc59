"""`sandkasten attach SESSION PROCESS`: this terminal becomes the process's terminal.

Who runs this: the CLI process, talking to the running daemon over its HTTP API (a live
terminal needs the daemon: it journals every keystroke and watches the process). The local
terminal goes into raw mode; keys go to the process's stdin as they are typed (each write a
`process.input` event), its output is replayed from its log and then followed live, a resize
of this terminal (SIGWINCH) resizes the process's, and the detach key (Ctrl-] by default)
leaves with the process still running. When the process ends, attach exits with its code.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from typing import Any

from sandkasten.cli.args import Failed, Usage

DETACH_KEYS = {"ctrl-]": b"\x1d", "ctrl-\\": b"\x1c", "ctrl-q": b"\x11", "ctrl-p": b"\x10"}


def detach_byte(name: str) -> bytes:
    key = DETACH_KEYS.get(name.lower())
    if key is None:
        raise Usage(f"--detach-key must be one of {', '.join(DETACH_KEYS)} (got {name!r})")
    return key


def daemon_url(cfg: Any) -> str:
    host = cfg.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{cfg.port}" if ":" in host else f"http://{host}:{cfg.port}"


def terminal_size(fd: int) -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


class Attachment:
    def __init__(self, client: Any, sid: str, process_id: str, detach: bytes) -> None:
        self.client, self.sid, self.process_id, self.detach = client, sid, process_id, detach
        self.done = threading.Event()
        self.outcome: Any = None
        self.error: BaseException | None = None
        self.wake_r, self.wake_w = os.pipe()

    def run(self, stdin_fd: int, stdout: Any) -> int:
        proc = self.client.get_process(self.sid, self.process_id)
        tty = os.isatty(stdin_fd)
        if tty and proc.pty:
            self._resize(stdin_fd)
        saved = None
        if tty:   # raw before any output shows, and without flushing what was typed already
            import termios
            import tty as tty_mod

            saved = termios.tcgetattr(stdin_fd)
            tty_mod.setraw(stdin_fd, termios.TCSANOW)
            previous = signal.signal(signal.SIGWINCH, lambda *_: os.write(self.wake_w, b"w"))
        reader = threading.Thread(target=self._follow, args=(stdout,), daemon=True)
        reader.start()
        try:
            detached = self._pump(stdin_fd, tty and bool(proc.pty))
        finally:
            if saved is not None:
                import termios

                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
                signal.signal(signal.SIGWINCH, previous)
            os.close(self.wake_r)
            os.close(self.wake_w)
        if detached:
            print(f"\r\n[detached from {self.process_id}; it keeps running: "
                  f"sandkasten attach {self.sid} {self.process_id}]", file=sys.stderr, flush=True)
            return 0
        reader.join(timeout=5)
        if self.error is not None:
            raise Failed(f"unable to follow process {self.process_id}: {self.error}")
        done = self.outcome
        if done is None:
            return 1
        how = f"signal {done.signal}" if done.signal else f"exit code {done.exit_code}"
        print(f"\r\n[process {self.process_id} ended: {how}]", file=sys.stderr, flush=True)
        return done.exit_code if done.exit_code is not None else 128 + _signum(done.signal)

    def _pump(self, stdin_fd: int, resizable: bool) -> bool:
        """Keys to the process until it ends (False) or the detach key (True)."""
        from sandkasten.client import ProcessExited

        stdin_open = True
        while not self.done.is_set():
            watch = [self.wake_r] + ([stdin_fd] if stdin_open else [])
            ready, _, _ = select.select(watch, [], [], 0.2)
            if self.wake_r in ready:
                os.read(self.wake_r, 64)
                if resizable:
                    self._resize(stdin_fd)
            if stdin_fd not in ready:
                continue
            data = os.read(stdin_fd, 4096)
            if self.detach in data:
                data = data[:data.index(self.detach)]
                if data:
                    self._send(data)
                return True
            try:
                if not data:   # our stdin ended (a pipe): pass the end on, keep showing output
                    stdin_open = False
                    self.client.write_stdin(self.sid, self.process_id, b"", eof=True)
                else:
                    self._send(data)
            except ProcessExited:
                self.done.wait(5)
        return False

    def _send(self, data: bytes) -> None:
        from sandkasten.client import ProcessExited

        try:
            self.client.write_stdin(self.sid, self.process_id, data)
        except ProcessExited:
            self.done.wait(5)

    def _resize(self, fd: int) -> None:
        size = terminal_size(fd)
        if size is not None:
            try:
                self.client.resize(self.sid, self.process_id, *size)
            except Exception:  # noqa: BLE001 - a resize racing the exit is not worth a failure
                pass

    def _follow(self, stdout: Any) -> None:
        from sandkasten.client import ExecChunk

        try:
            for event in self.client.process_stream(self.sid, self.process_id):
                if isinstance(event, ExecChunk):
                    stdout.write(event.chunk.encode("utf-8", "surrogateescape"))
                    stdout.flush()
                else:
                    self.outcome = event
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e
        finally:
            self.done.set()
            try:
                os.write(self.wake_w, b"d")
            except OSError:
                pass


def _signum(name: str | None) -> int:
    try:
        return int(signal.Signals[name]) if name else 0
    except KeyError:
        return 0


def attach(cfg: Any, sid: str, process_id: str, detach_key: str = "ctrl-]") -> int:
    from sandkasten.client import Client, DaemonUnreachable, NotFound

    detach = detach_byte(detach_key)
    try:
        with Client(daemon_url(cfg), api_key=cfg.api_key or None, retry_for=5.0) as client:
            return Attachment(client, sid, process_id, detach).run(sys.stdin.fileno(), sys.stdout.buffer)
    except DaemonUnreachable:
        raise Failed(f"unable to attach to {process_id}: no daemon answers at {daemon_url(cfg)} "
                     "(a live terminal needs the daemon: sandkasten daemon -d)") from None
    except NotFound as e:
        raise Failed(f"unable to attach to {process_id}: {e}") from None
