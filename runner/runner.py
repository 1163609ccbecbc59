"""The runner: PID 1 inside a sandbox.

Who runs this: a process forked from the spawner (zygote) after the sandbox was set up
and pivot_root'ed. It is single-threaded, uses only the stdlib and imports nothing at run
time (the image may have no Python). It

- reaps every zombie (PID 1 duty) and restarts the shell if it dies;
- serves a unix socket (bound on the host side before pivot_root) speaking `protocol`;
- writes each exec's output to a framed log file as it arrives (created with the first
  output), through a directory fd opened before pivot_root — never to a pipe the daemon
  owns, so a dead daemon cannot block or kill the workload;
- records each exec's start and result in the session's ledger next to the logs
  (`results`), so a restarted daemon (or a second client, or the next runner) can read it;
  an exec id is run at most once, ever.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from runner import protocol
from runner.processes import Processes
from runner.results import Results
from runner.shell import Shell

INTERRUPT_GRACE = 1.0     # SIGINT → SIGKILL of the command's new processes
KILL_GRACE = 1.0          # → kill and restart the whole shell
MAX_LOG_BYTES = 256 * 1024 * 1024
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class Exec:
    __slots__ = ("id", "started", "deadline", "stage", "log_fd", "log_bytes", "out", "err",
                 "sha", "truncated", "start_ticks", "waiters", "ack", "oom_start", "log_error")

    def __init__(self, exec_id: str, log_fd: int, timeout_s: float, oom_start: int = 0):
        self.id = exec_id
        self.started = time.time()
        self.deadline = time.monotonic() + timeout_s
        self.stage = 0            # 0 running, 1 interrupted, 2 killed
        self.log_fd = log_fd
        self.log_bytes = self.out = self.err = 0
        self.sha = hashlib.sha256()
        self.truncated = False
        self.start_ticks = int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)
        self.waiters: list[socket.socket] = []
        self.ack: tuple[socket.socket, float] | None = None   # "running" is said then, if still running
        self.oom_start = oom_start
        self.log_error = ""       # why the output log could not be written (e.g. ENOSPC)


class Runner:
    def __init__(self, listener: socket.socket, logs_fd: int, env: dict[str, str],
                 before_exec: Callable[[], None], oom_fd: int = -1):
        self.listener = listener
        self.logs_fd = logs_fd
        self.oom_fd = oom_fd
        self.shell = Shell(env, before_exec)
        self.current: Exec | None = None
        self.results = Results(logs_fd)
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}
        self.cwd = "/workspace"
        self.shell_restarts = 0
        self.poll = select.poll()
        self.procs = Processes(logs_fd, self.poll, self.shell, self.results, self._reply)

    # ------------------------------------------------------------------ main loop
    def serve(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.listener.setblocking(False)
        self.poll.register(self.listener, select.POLLIN)
        self.poll.register(wake_r, select.POLLIN)
        self._start_shell()
        self.terminating = False
        while not self.terminating:
            self._register_shell_stdin()
            try:
                events = self.poll.poll(self._poll_timeout())
            except InterruptedError:
                events = []
            for fd, mask in events:
                if fd == wake_r:
                    self._on_signals(wake_r)
                elif fd == self.listener.fileno():
                    self._accept()
                elif fd == self.shell.stdin:
                    self.shell.write_pending()
                elif fd in (self.shell.stdout, self.shell.stderr):
                    self._drain(fd)
                elif fd == self.shell.status:
                    self._on_status(mask)
                elif fd in self.clients:
                    self._on_client(fd, mask)
                elif self.procs.owns(fd):
                    self.procs.on_event(fd, mask)
            self._check_deadline()
            self._check_ack()
            self.procs.check_deadlines()
        self.procs.kill_all()
        self.shell.kill()

    def _poll_timeout(self) -> int:
        cur = self.current
        deadlines = [d for d in (cur.deadline if cur else None, cur.ack[1] if cur and cur.ack else None,
                                 self.procs.next_deadline()) if d is not None]
        if not deadlines:
            return -1
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def _register_shell_stdin(self) -> None:
        if self.shell.pending and self.shell.stdin >= 0:
            self.poll.register(self.shell.stdin, select.POLLOUT)
        elif self.shell.stdin >= 0:
            try:
                self.poll.unregister(self.shell.stdin)
            except KeyError:
                pass

    # ------------------------------------------------------------------ the shell
    def _start_shell(self) -> None:
        self.shell.start()
        for fd in (self.shell.stdout, self.shell.stderr, self.shell.status):
            self.poll.register(fd, select.POLLIN)
        self.cwd = "/workspace"

    def _on_signals(self, wake_r: int) -> None:
        try:
            sigs = os.read(wake_r, 512)
        except BlockingIOError:
            sigs = b""
        if signal.SIGTERM in sigs:
            self.terminating = True
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.shell.pid:
                self._on_shell_death(os.waitstatus_to_exitcode(status))
            else:
                self.procs.on_exit(pid, status)

    def _on_shell_death(self, code: int) -> None:
        """The shell exited (`exit 3` in a command, a crash, or our own kill): finish the
        current exec with what we know and start a fresh shell."""
        for fd in (self.shell.stdout, self.shell.stderr):
            self._drain(fd)
        for fd in (self.shell.stdout, self.shell.stderr, self.shell.status, self.shell.stdin):
            try:
                self.poll.unregister(fd)
            except KeyError:
                pass
        self.shell.close()
        self.shell_restarts += 1
        if self.current is not None:
            exit_code = code if code >= 0 else 128 - code
            self._finish(exit_code, self.cwd, shell_restarted=True)
        self._start_shell()

    def _on_status(self, mask: int) -> None:
        lines = self.shell.read_status()  # only what the shell process itself wrote (see shell.py)
        if lines is None:  # the shell closed fd 9: it is exiting; SIGCHLD follows
            try:
                self.poll.unregister(self.shell.status)
            except KeyError:
                pass
            return
        for line in lines:
            parts = line.split(" ", 2)
            if len(parts) != 3 or self.current is None or parts[0] != self.current.id \
                    or not parts[1].isdigit():
                continue
            parts[2] = self.shell.real_cwd(parts[2])
            self.cwd = parts[2]
            for fd in (self.shell.stdout, self.shell.stderr):
                self._drain(fd)
            self._finish(int(parts[1]), parts[2], shell_restarted=False)

    def _drain(self, fd: int) -> None:
        stream = protocol.STDOUT if fd == self.shell.stdout else protocol.STDERR
        for _ in range(64):
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self._record(stream, data)
            if len(data) < 65536:
                return

    def _record(self, stream: int, data: bytes) -> None:
        cur = self.current
        if cur is None:  # a background job wrote while no exec is running: nobody asked for it
            return
        if stream == protocol.STDOUT:
            cur.out += len(data)
        else:
            cur.err += len(data)
        cur.sha.update(data)
        if cur.truncated or cur.log_bytes + len(data) > MAX_LOG_BYTES:
            cur.truncated = True
            return
        if cur.log_fd < 0 and not self._open_log(cur):
            return
        try:
            os.write(cur.log_fd, protocol.frame(stream, data, time.time()))
            cur.log_bytes += protocol.FRAME.size + len(data)
        except OSError as e:  # disk full: keep draining so the workload never blocks
            cur.truncated = True
            cur.log_error = cur.log_error or errno.errorcode.get(e.errno or 0, str(e.errno))

    # ------------------------------------------------------------------ execs
    def _begin(self, exec_id: str, cmd: str, timeout_ms: int, fresh: bool = False) -> dict:
        """Hand a command to the shell — once per exec id, ever. A `fresh` id (the daemon has
        just journaled it and never sent it before) needs no look-up; any other is checked
        against what this runner, an earlier one and the ledger know."""
        if not fresh:
            known = self._lookup(exec_id)
            if known is not None:
                return known
        if self.current is not None:
            return {"ok": False, "error": "busy", "message": f"exec {self.current.id} is running"}
        if not fresh and self.results.started_before(exec_id):  # by a runner that no longer exists
            return {"ok": True, "id": exec_id, "state": "lost",
                    "reason": "started by an earlier runner that died"}
        self.results.started(exec_id)
        # the log is created with the first output
        self.current = Exec(exec_id, -1, max(timeout_ms, 1) / 1000, self._oom_kills())
        self.shell.send(exec_id, cmd)
        return {"ok": True, "id": exec_id, "state": "running"}

    def _open_log(self, cur: Exec) -> bool:
        try:
            cur.log_fd = os.open(cur.id + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600,
                                 dir_fd=self.logs_fd)
            return True
        except OSError as e:   # disk full: keep draining so the workload never blocks
            cur.truncated = True
            cur.log_error = cur.log_error or errno.errorcode.get(e.errno or 0, str(e.errno))
            return False

    def _finish(self, exit_code: int, cwd: str, shell_restarted: bool) -> None:
        cur = self.current
        assert cur is not None
        self.current = None
        if cur.log_fd >= 0:
            os.close(cur.log_fd)
        now = time.time()
        result = {
            "ok": True, "id": cur.id, "state": "finished", "exit_code": exit_code, "cwd": cwd,
            "started_at": cur.started, "finished_at": now,
            "duration_ms": round((now - cur.started) * 1000, 3),
            "stdout_bytes": cur.out, "stderr_bytes": cur.err,
            "output_sha256": cur.sha.hexdigest(), "timed_out": cur.stage > 0,
            "truncated": cur.truncated, "shell_restarted": shell_restarted,
            "oom_kills": max(0, self._oom_kills() - cur.oom_start), "log_error": cur.log_error,
        }
        self.results.store(result)
        for client in cur.waiters:
            self._reply(client, result)

    def _oom_kills(self) -> int:
        """The sandbox cgroup's OOM kill count so far (0 when unknown)."""
        if self.oom_fd < 0:
            return 0
        try:
            for line in os.pread(self.oom_fd, 4096, 0).decode().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def _lookup(self, exec_id: str) -> dict | None:
        if self.current is not None and self.current.id == exec_id:
            return {"ok": True, "id": exec_id, "state": "running"}
        return self.results.lookup(exec_id)

    def _check_ack(self) -> None:
        """A delayed "running" (`ack_after_ms`): said only to a command still running by then,
        so a short one costs its client a single answer."""
        cur = self.current
        if cur is not None and cur.ack is not None and time.monotonic() >= cur.ack[1]:
            conn, cur.ack = cur.ack[0], None
            self._reply(conn, {"ok": True, "id": cur.id, "state": "running", "delayed": True})

    def _check_deadline(self) -> None:
        """Timeout: SIGINT the shell's process group (the shell traps it; background jobs
        ignore it), then SIGKILL every process started since the command began (also those it
        moved into a new session with setsid), then again and restart the shell."""
        cur = self.current
        if cur is None or time.monotonic() < cur.deadline:
            return
        if cur.stage == 0:
            cur.stage = 1
            self.shell.interrupt()
            cur.deadline = time.monotonic() + INTERRUPT_GRACE
        elif cur.stage == 1:
            cur.stage = 2
            self._kill_started_since(cur.start_ticks)
            cur.deadline = time.monotonic() + KILL_GRACE
        else:
            cur.deadline = time.monotonic() + KILL_GRACE
            self._kill_started_since(cur.start_ticks)  # a fork loop may have refilled it meanwhile
            self.shell.kill()

    def _kill_started_since(self, ticks: int) -> None:
        """SIGKILL every process of the sandbox started at or after `ticks` — whatever its
        process group or session (`setsid` leaves the shell's group; its orphans are reparented
        to us) — but PID 1, the shell, and what the runner itself started (`_own_pids`)."""
        procs: dict[int, tuple[int, int]] = {}  # pid: (ppid, start ticks); /proc shows only the sandbox
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                procs[int(name)] = (int(fields[1]), int(fields[19]))
            except (OSError, IndexError, ValueError):
                continue
        spared = {1, self.shell.pid} | self._own_pids()
        for pid, (_, start) in procs.items():
            if pid in spared or start < ticks - 1 or _descends(pid, procs, spared - {1, self.shell.pid}):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _own_pids(self) -> set[int]:
        """Processes the runner started itself, besides the shell (the processes API's): a
        command's timeout never touches them or their children."""
        return set(self.procs.by_pid)

    # ------------------------------------------------------------------ clients
    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            self.clients[conn.fileno()] = (conn, bytearray())
            self.poll.register(conn, select.POLLIN)

    def _on_client(self, fd: int, mask: int) -> None:
        conn, buf = self.clients[fd]
        try:
            data = conn.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        buf += data
        if len(buf) > protocol.MAX_LINE:
            self._drop(fd)
            return
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            self._handle(conn, line)

    def _drop(self, fd: int) -> None:
        conn, _ = self.clients.pop(fd)
        try:
            self.poll.unregister(fd)
        except KeyError:
            pass
        if self.current is not None and conn in self.current.waiters:
            self.current.waiters.remove(conn)
            if self.current.ack is not None and self.current.ack[0] is conn:
                self.current.ack = None
        for proc in self.procs.live.values():
            if conn in proc.waiters:
                proc.waiters.remove(conn)
        conn.close()

    def _reply(self, conn: socket.socket, msg: dict) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(5)
            conn.sendall(protocol.encode(msg))
            conn.setblocking(False)
        except OSError:
            if conn.fileno() in self.clients:
                self._drop(conn.fileno())

    def _handle(self, conn: socket.socket, line: bytes) -> None:
        reply: dict
        try:
            msg = protocol.decode(line)
            op = msg.get("op")
            if op == "ping":
                reply = {"ok": True, "shell_pid": self.shell.pid, "shell": self.shell.path,
                         "busy": self.current.id if self.current else None,
                         "shell_restarts": self.shell_restarts, "cwd": self.cwd}
            elif op == "exec":
                exec_id = msg["id"]
                if not _valid_id(exec_id) or not isinstance(msg.get("cmd"), str):
                    raise ValueError("exec needs a valid id and a string cmd")
                reply = self._begin(exec_id, msg["cmd"], int(msg.get("timeout_ms", 120_000)), msg.get("fresh") is True)
                cur = self.current   # running: it is this exec
                if msg.get("wait") and reply.get("state") == "running" and cur is not None:
                    after = msg.get("ack_after_ms")
                    if msg.get("ack") and isinstance(after, int) and after > 0 and cur.ack is None:
                        cur.ack = (conn, time.monotonic() + after / 1000)   # "running" later, if still
                    elif msg.get("ack"):  # say "running" now, the result later on this connection
                        self._reply(conn, reply)
                    cur.waiters.append(conn)
                    return
            elif op in ("status", "wait"):
                exec_id = msg["id"]
                reply = (self._lookup(exec_id) if _valid_id(exec_id) else None) \
                    or {"ok": True, "id": exec_id, "state": "unknown"}
                if op == "wait" and reply["state"] == "running" and self.current is not None:
                    self.current.waiters.append(conn)
                    return
            elif op == "env":  # variables for every later shell (a restart keeps them)
                values = msg["set"]
                if not isinstance(values, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) and "\0" not in k + v and "=" not in k
                        for k, v in values.items()):
                    raise ValueError("env needs an object of string names and values")
                self.shell.env.update(values)
                reply = {"ok": True}
            elif op in _PROC_OPS:
                answer = self._process_op(conn, op, msg)
                if answer is None:   # a wait on a running process: answered when it exits
                    return
                reply = answer
            elif op == "interrupt":
                if self.current is not None:
                    self.current.deadline = time.monotonic()
                reply = {"ok": True}
            else:
                reply = {"ok": False, "error": "bad_request", "message": f"unknown op {op!r}"}
        except (ValueError, KeyError, TypeError) as e:
            reply = {"ok": False, "error": "bad_request", "message": str(e)}
        self._reply(conn, reply)


    def _process_op(self, conn: socket.socket, op: str, msg: dict) -> dict | None:
        if op == "proc_list":
            return {"ok": True, "processes": self.procs.listing()}
        proc_id = msg["id"]
        if not _valid_id(proc_id):
            raise ValueError("a process op needs a valid id")
        if op == "proc_start":
            return self.procs.start(msg)
        if op == "proc_write":
            data = base64.b64decode(msg.get("data_base64") or "", validate=True)
            seq = msg.get("seq")
            if seq is not None and (not isinstance(seq, int) or seq < 1):
                raise ValueError("seq must be a positive number")
            return self.procs.write(proc_id, data, bool(msg.get("eof")), seq)
        if op == "proc_resize":
            return self.procs.resize(proc_id, _bounded(msg["rows"]), _bounded(msg["cols"]))
        if op == "proc_signal":
            signum = msg["signal"]
            if not isinstance(signum, int) or not 0 < signum < 65:
                raise ValueError("signal must be a number 1-64")
            return self.procs.signal(proc_id, signum)
        reply = self.procs.lookup(proc_id) or {"ok": True, "id": proc_id, "state": "unknown"}
        if op == "proc_wait" and reply["state"] == "running":
            self.procs.live[proc_id].waiters.append(conn)
            return None
        return reply


_PROC_OPS = frozenset({"proc_start", "proc_write", "proc_resize", "proc_signal", "proc_status", "proc_wait",
                       "proc_list"})


def _bounded(n) -> int:
    if not isinstance(n, int) or not 1 <= n <= 10_000:
        raise ValueError("rows and cols must be numbers 1-10000")
    return n


def _descends(pid: int, procs: dict[int, tuple[int, int]], ancestors: set[int]) -> bool:
    """Whether `pid` is one of `ancestors` or below one of them (by parent pid)."""
    seen = 0
    while pid in procs and seen < 4096:
        if pid in ancestors:
            return True
        pid, seen = procs[pid][0], seen + 1
    return pid in ancestors


def _valid_id(exec_id) -> bool:
    return (isinstance(exec_id, str) and 0 < len(exec_id) <= 64 and exec_id[0].isalnum()
            and all(c.isalnum() or c in "-_" for c in exec_id) and exec_id.isascii())


def run(listener: socket.socket, logs_fd: int, env: dict[str, str],
        before_exec: Callable[[], None], oom_fd: int = -1) -> None:
    """Entry point, called in the sandbox's PID 1 after setup. Never returns normally."""
    Runner(listener, logs_fd, env, before_exec, oom_fd).serve()


