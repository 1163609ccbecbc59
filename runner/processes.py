"""Background processes beside the persistent shell: plain pipes or a pseudo-terminal.

Who runs this: the runner (PID 1 in the sandbox), single-threaded, stdlib only; everything is
imported before the zygote forks (after pivot_root nothing can be imported). A process is a
child of the runner, so it outlives the daemon like the shell does. Per process the runner

- forks a child that starts its own session (and, with a PTY, takes the terminal as its
  controlling tty), drops privileges like the shell (`before_exec`) and runs `sh -c CMD`;
- writes its output to `<id>.log` in the exec log format (frames; a PTY's output is one
  stream, stdout) as it arrives — the daemon tails that file, never a pipe;
- bounds the log: past `max_log_bytes` the oldest frames are dropped by punching a hole
  at the file's start (offsets stay valid; `dropped_bytes` says how much output is gone);
- queues stdin without ever blocking, and delivers EOF (pipes: close; PTY: ^D);
- on exit keeps the result in `<id>.json` (written atomically), so a daemon that was down
  learns the real exit code later. A process id is started at most once, ever.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import select
import signal
import struct
import termios
import time
from collections.abc import Callable
from socket import socket

from runner import protocol

MAX_STDIN_PENDING = 1 << 20        # queued stdin bytes a process has not read yet
TERM_GRACE = 2.0                   # timeout: SIGTERM, then SIGKILL of its process group this much later
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
MARK_EVERY = 64 * 1024             # a frame boundary is remembered once per this many log bytes
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)


def _punch(fd: int, length: int) -> bool:
    """Free the first `length` bytes of a file (they read back as zeros); False if unsupported."""
    return _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, length) == 0


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Proc:
    __slots__ = ("id", "pid", "pty", "rows", "cols", "stdin", "outputs", "log_fd", "log_bytes",
                 "marks", "dropped_log", "dropped", "out", "err", "sha", "pending", "eof_pending",
                 "input_bytes", "input_seq", "started", "deadline", "stage", "result", "waiters", "max_log")

    def __init__(self, proc_id: str, pid: int, log_fd: int, max_log: int):
        self.id, self.pid, self.log_fd, self.max_log = proc_id, pid, log_fd, max_log
        self.pty = False
        self.rows = self.cols = 0
        self.stdin = -1                        # pipe write end, or the PTY master (same fd as output)
        self.outputs: dict[int, int] = {}      # fd -> protocol stream
        self.log_bytes = 0                     # the log's size (its end offset)
        self.marks: list[tuple[int, int]] = []  # (log offset of a frame start, output bytes before it)
        self.dropped_log = 0                   # log bytes punched away at the start
        self.dropped = 0                       # output bytes they held
        self.out = self.err = self.input_bytes = self.input_seq = 0
        self.sha = hashlib.sha256()
        self.pending = bytearray()
        self.eof_pending = False
        self.started = time.time()
        self.deadline: float | None = None
        self.stage = 0                         # 0 running, 1 SIGTERM sent, 2 SIGKILL sent
        self.result: dict | None = None
        self.waiters: list = []

    def view(self) -> dict:
        if self.result is not None:
            return self.result
        return {"ok": True, "id": self.id, "state": "running", "pid": self.pid, "started_at": self.started,
                "pty": {"rows": self.rows, "cols": self.cols} if self.pty else None,
                "output_sha256": self.sha.copy().hexdigest(), **self._counts()}

    def _counts(self) -> dict:
        return {"stdout_bytes": self.out, "stderr_bytes": self.err, "log_bytes": self.log_bytes,
                "dropped_bytes": self.dropped, "log_start": self.dropped_log, "input_bytes": self.input_bytes,
                "input_seq": self.input_seq}


class Processes:
    """The runner's table of processes: start, feed, resize, signal, reap."""

    def __init__(self, logs_fd: int, poll: select.poll, shell, results,
                 reply: Callable[[socket, dict], None]) -> None:
        self.logs_fd = logs_fd
        self.reply = reply                     # the runner's: send a message to a client connection
        self.results = results                 # runner.results.Results: shared with the execs
        self.poll = poll
        self.shell = shell                     # its env and its privilege drop are the processes' too
        self.live: dict[str, Proc] = {}
        self.by_fd: dict[int, Proc] = {}
        self.by_pid: dict[int, Proc] = {}

    # ------------------------------------------------------------------ start
    def start(self, msg: dict) -> dict:
        proc_id = msg["id"]
        known = self.lookup(proc_id)
        if known is not None:
            return known
        cmd, cwd, env, pty = msg["cmd"], msg.get("cwd") or "/workspace", msg.get("env") or {}, msg.get("pty")
        if not isinstance(cmd, str) or "\0" in cmd or not isinstance(cwd, str) or "\0" in cwd:
            raise ValueError("start needs a string cmd and cwd without NUL bytes")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) and "=" not in k
                                                and "\0" not in k + v for k, v in env.items()):
            raise ValueError("env needs an object of string names and values")
        try:
            log_fd = os.open(proc_id + ".log", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                             0o600, dir_fd=self.logs_fd)
        except FileExistsError:   # started before, by a runner that no longer exists
            return {"ok": True, "id": proc_id, "state": "lost", "reason": "started by an earlier runner that died"}
        except OSError as e:
            return {"ok": False, "error": "io", "message": f"unable to create log for process {proc_id}: {e.strerror}"}
        try:
            proc = self._spawn(proc_id, cmd, cwd, {**self.shell.env, **env}, pty, log_fd,
                               int(msg.get("max_log_bytes") or protocol.MAX_PROCESS_LOG))
        except OSError as e:
            os.close(log_fd)
            self.results.store({"ok": True, "id": proc_id, "state": "exited", "exit_code": 127, "signal": None,
                         "started_at": time.time(), "exited_at": time.time(), "pid": None,
                         "error": f"unable to start: {e.strerror or e}", "stdout_bytes": 0, "stderr_bytes": 0,
                         "log_bytes": 0, "dropped_bytes": 0, "log_start": 0, "input_bytes": 0,
                         "output_sha256": hashlib.sha256().hexdigest()})
        timeout_ms = msg.get("timeout_ms")
        if timeout_ms:
            proc.deadline = time.monotonic() + int(timeout_ms) / 1000
        return proc.view()

    def _spawn(self, proc_id: str, cmd: str, cwd: str, env: dict, pty, log_fd: int, max_log: int) -> Proc:
        close_after: tuple[int, ...]
        if pty:
            rows, cols = int(pty["rows"]), int(pty["cols"])
            master, slave = os.openpty()
            set_winsize(master, rows, cols)
            child_fds = (slave, slave, slave)
            parent_fds = {master: protocol.STDOUT}
            stdin_w, close_after = master, (slave,)
        else:
            rows = cols = 0
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            child_fds = (in_r, out_w, err_w)
            parent_fds = {out_r: protocol.STDOUT, err_r: protocol.STDERR}
            stdin_w, close_after = in_w, (in_r, out_w, err_w)
        shell = self.shell.path or "/bin/sh"
        pid = os.fork()
        if pid == 0:   # the process: its own session (and terminal), privileges dropped right before exec
            try:
                os.setsid()
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
                    signal.signal(sig, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                for target, fd in enumerate(child_fds):
                    os.dup2(fd, target)
                if pty:
                    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
                os.closerange(3, 65536)
                try:
                    os.chdir(cwd)
                except OSError as e:
                    os.write(2, f"sandkasten: unable to enter {cwd}: {e.strerror}\n".encode())
                    os._exit(126)
                self.shell.before_exec()
                os.execve(shell, [shell, "-c", cmd], env)
            except BaseException as e:  # noqa: BLE001 - report and die, never return into the runner
                try:
                    os.write(2, f"sandkasten: unable to start process: {e}\n".encode())
                except OSError:
                    pass
            finally:
                os._exit(127)
        for fd in close_after:
            os.close(fd)
        proc = Proc(proc_id, pid, log_fd, max_log)
        proc.pty, proc.rows, proc.cols, proc.stdin = bool(pty), rows, cols, stdin_w
        proc.outputs = parent_fds
        for fd in {stdin_w, *parent_fds}:
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        for fd in parent_fds:
            self.poll.register(fd, select.POLLIN)
            self.by_fd[fd] = proc
        if not pty:
            self.by_fd[stdin_w] = proc
        self.live[proc_id] = proc
        self.by_pid[pid] = proc
        return proc

    # ------------------------------------------------------------------ input
    def write(self, proc_id: str, data: bytes, eof: bool, seq: int | None = None) -> dict:
        """Queue stdin bytes (and/or EOF). A numbered write (`seq`, the journal's count of inputs)
        is taken once: a repeat of one already taken is acknowledged and dropped, so a daemon
        that re-sends what it journaled after a crash never types anything twice."""
        proc = self.live.get(proc_id)
        if proc is None:
            return self._not_running(proc_id)
        if seq is not None:
            if seq <= proc.input_seq:
                return {"ok": True, "bytes": 0, "duplicate": True, "input_seq": proc.input_seq}
            if seq > proc.input_seq + 1:   # an earlier input has not arrived: the daemon sends it first
                return {"ok": False, "error": "gap", "input_seq": proc.input_seq,
                        "message": f"input {seq} of process {proc_id} came before input {proc.input_seq + 1}"}
        if len(proc.pending) + len(data) > MAX_STDIN_PENDING:
            return {"ok": False, "error": "stdin_full", "message": f"process {proc_id} has not read "
                    f"{len(proc.pending)} bytes of its stdin yet; retry when it has"}
        proc.pending += data
        proc.input_bytes += len(data)
        if seq is not None:
            proc.input_seq = seq
        if eof:
            proc.eof_pending = True
        self._flush(proc)
        return {"ok": True, "bytes": len(data), "input_seq": proc.input_seq}

    def _flush(self, proc: Proc) -> None:
        while proc.pending and proc.stdin >= 0:
            try:
                n = os.write(proc.stdin, proc.pending)
            except BlockingIOError:
                break
            except OSError:   # it closed its stdin (or exited): what it never read is gone
                proc.pending.clear()
                break
            del proc.pending[:n]
        if not proc.pending and proc.eof_pending and proc.stdin >= 0:
            proc.eof_pending = False
            if proc.pty:
                try:
                    os.write(proc.stdin, b"\x04")   # ^D: end of input on a terminal in canonical mode
                except OSError:
                    pass
            else:
                self._close_stdin(proc)
        self._watch_stdin(proc)

    def _watch_stdin(self, proc: Proc) -> None:
        if proc.stdin < 0:
            return
        mask = select.POLLIN if proc.pty else 0
        if proc.pending:
            mask |= select.POLLOUT
        if mask:
            self.poll.register(proc.stdin, mask)
        else:
            try:
                self.poll.unregister(proc.stdin)
            except KeyError:
                pass

    def _close_stdin(self, proc: Proc) -> None:
        if not proc.pty and proc.stdin >= 0:
            try:
                self.poll.unregister(proc.stdin)
            except KeyError:
                pass
            self.by_fd.pop(proc.stdin, None)
            os.close(proc.stdin)
            proc.stdin = -1

    def resize(self, proc_id: str, rows: int, cols: int) -> dict:
        proc = self.live.get(proc_id)
        if proc is None:
            return self._not_running(proc_id)
        if not proc.pty:
            return {"ok": False, "error": "not_a_terminal", "message": f"process {proc_id} has no terminal to resize"}
        set_winsize(proc.stdin, rows, cols)   # the kernel sends SIGWINCH to its foreground group
        proc.rows, proc.cols = rows, cols
        return {"ok": True}

    def signal(self, proc_id: str, signum: int) -> dict:
        proc = self.live.get(proc_id)
        if proc is None:
            return self._not_running(proc_id)
        _kill_group(proc.pid, signum)
        return {"ok": True}

    def _not_running(self, proc_id: str) -> dict:
        known = self.lookup(proc_id)
        if known is None:
            return {"ok": False, "error": "unknown", "message": f"no process {proc_id} in this sandbox"}
        return {"ok": False, "error": "exited", "message": f"process {proc_id} has exited", "result": known}

    # ------------------------------------------------------------------ output
    def owns(self, fd: int) -> bool:
        return fd in self.by_fd

    def on_event(self, fd: int, mask: int) -> None:
        proc = self.by_fd[fd]
        if fd == proc.stdin and not proc.pty and mask & (select.POLLERR | select.POLLHUP):
            proc.pending.clear()   # it closed its stdin: what it never read is gone
            self._close_stdin(proc)
            return
        if mask & select.POLLOUT:
            self._flush(proc)
        if fd in proc.outputs and mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
            self._drain(proc, fd)

    def _drain(self, proc: Proc, fd: int) -> None:
        stream = proc.outputs[fd]
        for _ in range(64):
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:   # EIO: the terminal's last slave fd closed
                data = b""
            if not data:
                self._close_output(proc, fd)
                return
            self._record(proc, stream, data)
            if len(data) < 65536:
                return

    def _close_output(self, proc: Proc, fd: int) -> None:
        try:
            self.poll.unregister(fd)
        except KeyError:
            pass
        del proc.outputs[fd]
        self.by_fd.pop(fd, None)
        if proc.pty:
            proc.stdin = -1
        os.close(fd)

    def _record(self, proc: Proc, stream: int, data: bytes) -> None:
        if stream == protocol.STDOUT:
            proc.out += len(data)
        else:
            proc.err += len(data)
        proc.sha.update(data)
        if proc.log_fd < 0:
            proc.dropped += len(data)
            return
        if not proc.marks or proc.log_bytes - proc.marks[-1][0] >= MARK_EVERY:
            proc.marks.append((proc.log_bytes, proc.out + proc.err - len(data)))
        try:
            os.write(proc.log_fd, protocol.frame(stream, data, time.time()))
            proc.log_bytes += protocol.FRAME.size + len(data)
        except OSError:   # disk full: keep draining so the process never blocks; what is lost is counted
            proc.dropped += len(data)
            return
        if proc.log_bytes - proc.dropped_log > proc.max_log:
            self._drop_oldest(proc)

    def _drop_oldest(self, proc: Proc) -> None:
        """Punch away the oldest frames so about half the bound stays (whole frames only)."""
        target = proc.log_bytes - proc.max_log // 2
        keep = [m for m in proc.marks if m[0] > target]
        cut = [m for m in proc.marks if m[0] <= target]
        if not cut or cut[-1][0] <= proc.dropped_log:
            return
        offset, before = cut[-1]
        if not _punch(proc.log_fd, offset):   # no hole punching here: stop logging, count the rest
            os.close(proc.log_fd)
            proc.log_fd = -1
            return
        proc.dropped_log, proc.dropped = offset, before
        proc.marks = [cut[-1], *keep]

    # ------------------------------------------------------------------ exits and deadlines
    def on_exit(self, pid: int, status: int) -> bool:
        proc = self.by_pid.pop(pid, None)
        if proc is None:
            return False
        for fd in list(proc.outputs):
            self._drain(proc, fd)
            if fd in proc.outputs:   # a child it left behind still holds the pipe or terminal
                self._close_output(proc, fd)
        self._close_stdin(proc)
        if proc.log_fd >= 0:
            os.close(proc.log_fd)
        del self.live[proc.id]
        sig = -os.waitstatus_to_exitcode(status) if os.WIFSIGNALED(status) else None
        now = time.time()
        result = {"ok": True, "id": proc.id, "state": "exited", "pid": proc.pid,
                  "exit_code": None if sig else os.waitstatus_to_exitcode(status),
                  "signal": signal.Signals(sig).name if sig else None, "timed_out": proc.stage > 0,
                  "started_at": proc.started, "exited_at": now,
                  "pty": {"rows": proc.rows, "cols": proc.cols} if proc.pty else None,
                  "output_sha256": proc.sha.hexdigest(), **proc._counts()}
        self.results.store(result)
        for conn in proc.waiters:
            self.reply(conn, result)
        return True

    def next_deadline(self) -> float | None:
        deadlines = [p.deadline for p in self.live.values() if p.deadline is not None]
        return min(deadlines) if deadlines else None

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for proc in list(self.live.values()):
            if proc.deadline is None or now < proc.deadline:
                continue
            proc.stage += 1
            _kill_group(proc.pid, signal.SIGTERM if proc.stage == 1 else signal.SIGKILL)
            proc.deadline = now + TERM_GRACE if proc.stage == 1 else None

    def kill_all(self) -> None:
        for proc in self.live.values():
            _kill_group(proc.pid, signal.SIGKILL)

    # ------------------------------------------------------------------ results
    def lookup(self, proc_id: str) -> dict | None:
        proc = self.live.get(proc_id)
        return proc.view() if proc is not None else self.results.lookup(proc_id)

    def listing(self) -> list[dict]:
        return [p.view() for p in self.live.values()]


def _kill_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
