"""The persistent shell a runner owns.

Runs inside the sandbox, in the runner (PID 1). The shell is bash if the image has it,
else `sh`. It reads commands from a pipe the runner writes; each command is
`'__sk_exec' ID 'quoted command'`, which evals the command in the shell itself (so `cd`,
variables, functions and background jobs persist) and then reports `ID EXIT_CODE CWD`
on fd 9. The command runs with stdin from /dev/null and fd 9 closed, so it can neither eat
later commands nor forge a status line by plain means. Its stdout and stderr are set afresh
from spare copies of the output pipes (fds 7 and 8) for every command, so one that closes
or redirects them with `exec` does not silence the ones after it.

The status channel is out of reach of everything but the shell process itself: fd 9 is a
unix seqpacket socket whose runner end passes credentials (SO_PASSCRED), so the kernel
stamps every status line with the pid of the process that wrote it. A shell saves a copy of
fd 9 on a higher fd while a command runs, and subshells, background jobs and programs may
inherit that copy; a line any of them writes is dropped (`read_status`), as is one for an exec
other than the current one. The cwd a line names is believed only if it is the directory the
kernel says the shell is in (`/proc/<shell>/cwd`). In bash the protocol functions are
read-only and the command line quotes their name (no alias can stand in). What stays possible
is code running *in* the shell process itself changing how it reports its own command — see
`sandkasten security`.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Callable

OUT_FD, ERR_FD, STATUS_FD = 7, 8, 9  # spare stdout and stderr pipes; the status socket
_UCRED = struct.Struct("iII")        # struct ucred: pid, uid, gid
OOM_SCORE_ADJ_COMMANDS = 1000

# `trap 'return 130' INT`: a SIGINT (timeout) makes the innermost function return, so the
# interrupted command does not resume its loop; the runner escalates if it still does.
PRELUDE = b"""\
__sk_run() { eval "$1" </dev/null 1>&7 2>&8 7>&- 8>&- 9>&-; }
__sk_exec() { __sk_run "$2"; __sk_rc=$?; printf '%s %s %s\\n' "$1" "$__sk_rc" "$PWD" >&9; }
[ -n "$BASH_VERSION" ] && readonly -f __sk_run __sk_exec
trap 'return 130' INT
cd /workspace 2>/dev/null || cd /
"""


def quote(cmd: str) -> bytes:
    return b"'" + cmd.encode("utf-8", "surrogateescape").replace(b"'", b"'\\''") + b"'"


def command_line(exec_id: str, cmd: str) -> bytes:
    return b"'__sk_exec' " + exec_id.encode() + b" " + quote(cmd) + b"\n"


def pick_shell() -> str:
    for path in ("/bin/bash", "/usr/bin/bash", "/bin/sh", "/usr/bin/sh"):
        if os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("no /bin/bash or /bin/sh in the image")


class Shell:
    """One shell process and the pipes to it. Start it, write to it, know when it died."""

    def __init__(self, env: dict[str, str], before_exec: Callable[[], None]):
        self.env = env
        self.before_exec = before_exec
        self.pid = 0
        self.stdin = self.stdout = self.stderr = self.status = -1
        self.status_sock: socket.socket | None = None
        self.path = ""

    def start(self) -> None:
        self.path = pick_shell()
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_sock, st_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        st_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        st_r, st_w = st_sock.fileno(), st_peer.fileno()
        pid = os.fork()
        if pid == 0:  # the shell child: its own session, privileges dropped right before exec
            try:
                os.setsid()
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
                    signal.signal(sig, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                os.dup2(in_r, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                os.dup2(st_w, STATUS_FD)
                os.closerange(3, STATUS_FD)
                os.closerange(STATUS_FD + 1, 65536)
                os.dup2(1, OUT_FD)
                os.dup2(2, ERR_FD)
                os.chdir("/workspace" if os.path.isdir("/workspace") else "/")
                # commands are the OOM killer's first choice in the sandbox, never the runner
                # (raising a score needs no privilege; the runner's is -1000 where allowed)
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(str(OOM_SCORE_ADJ_COMMANDS))
                self.before_exec()
                os.execve(self.path, [self.path], self.env)
            except BaseException as e:  # noqa: BLE001 - report and die, never return into the runner
                os.write(2, f"runner: unable to start shell {self.path}: {e}\n".encode())
            finally:
                os._exit(127)
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        st_peer.close()
        self.status_sock = st_sock
        for fd in (in_w, out_r, err_r, st_r):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self.pid, self.stdin, self.stdout, self.stderr, self.status = pid, in_w, out_r, err_r, st_r
        self.pending = bytearray(PRELUDE)

    def read_status(self) -> list[str] | None:
        """Status lines the shell process itself wrote (None: the shell closed the channel).
        A line from any other process is dropped: the kernel names the writer's pid."""
        sock = self.status_sock
        if sock is None:   # closed already (`close`)
            return None
        lines: list[str] = []
        while True:
            try:
                data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return lines
            except OSError:
                return None
            if not data:
                return lines or None
            writer = next((_UCRED.unpack(d[:_UCRED.size])[0] for level, kind, d in anc
                           if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            if writer == self.pid:
                lines += data.decode("utf-8", "surrogateescape").splitlines()

    def real_cwd(self, claimed: str) -> str:
        """`claimed` (the shell's $PWD, symlinks kept) if it is the directory the kernel says
        the shell is in, else the kernel's path. Runs in the runner, which sees the sandbox's
        mounts as the shell does."""
        try:
            real = os.readlink(f"/proc/{self.pid}/cwd")
        except OSError:
            return claimed
        if real.endswith(" (deleted)"):
            return claimed if claimed == real[:-len(" (deleted)")] else "/"
        try:
            if os.path.isabs(claimed) and os.path.samestat(os.stat(claimed), os.stat(f"/proc/{self.pid}/cwd")):
                return claimed
        except OSError:
            pass
        return real

    def write_pending(self) -> None:
        """Push queued command bytes into the shell's stdin without ever blocking."""
        while self.pending:
            try:
                n = os.write(self.stdin, self.pending)
            except BlockingIOError:
                return
            except BrokenPipeError:
                self.pending.clear()
                return
            del self.pending[:n]

    def send(self, exec_id: str, cmd: str) -> None:
        self.pending += command_line(exec_id, cmd)
        self.write_pending()

    def interrupt(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for fd in (self.stdin, self.stdout, self.stderr):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.status_sock is not None:
            self.status_sock.close()
            self.status_sock = None
        self.stdin = self.stdout = self.stderr = self.status = -1
        self.pid = 0
