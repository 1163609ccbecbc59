"""The seccomp filter: its shape, its verdicts (run through a small classic-BPF interpreter for
both architectures), its syscall numbers against the installed kernel headers, and its effect on
the real kernel. The real-kernel probe installs the filter in a child process that keeps every
capability (so the filter alone is what refuses) and sits in a private mount namespace (so a
mount that slipped through would stay there)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sandkasten.errors import ConfigError, SandboxError
from sandkasten.runtime import seccomp

ARCHES = tuple(seccomp.AUDIT_ARCH)
FILTERING = ("mvp", "strict")
KNOWN_CODES = {
    seccomp.LD_ABS, seccomp.AND_K, seccomp.JEQ_K, seccomp.JGE_K, seccomp.JSET_K, seccomp.RET_K
}  # fmt: skip
JUMPS = {seccomp.JEQ_K, seccomp.JGE_K, seccomp.JSET_K}
EPERM = seccomp.RET_ERRNO | errno.EPERM
ENOSYS = seccomp.RET_ERRNO | errno.ENOSYS
EAFNOSUPPORT = seccomp.RET_ERRNO | errno.EAFNOSUPPORT
ALLOW, KILL = seccomp.RET_ALLOW, seccomp.RET_KILL_PROCESS


def decode(program: bytes) -> list[tuple[int, int, int, int]]:
    size = seccomp.INSTRUCTION.size
    return [seccomp.INSTRUCTION.unpack_from(program, i) for i in range(0, len(program), size)]


def run(program: bytes, nr: int, *args: int, arch: int) -> int:
    """Interpret the program on one struct seccomp_data, as the kernel would."""
    data = {seccomp.OFFSET_NR: nr, seccomp.OFFSET_ARCH: arch}
    for index, value in enumerate(args):
        data[seccomp.arg_low(index)] = value & 0xFFFFFFFF
        data[seccomp.arg_low(index) + 4] = value >> 32
    code = decode(program)
    pc, a = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == seccomp.RET_K:
            return k
        if op == seccomp.LD_ABS:
            a = data.get(k, 0)
        elif op == seccomp.AND_K:
            a &= k
        else:
            taken = {seccomp.JEQ_K: a == k, seccomp.JGE_K: a >= k, seccomp.JSET_K: bool(a & k)}
            pc += jt if taken[op] else jf


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("profile", FILTERING)
def test_program_is_well_formed(profile: str, arch: str) -> None:
    program = seccomp.build_filter(profile, arch)
    assert isinstance(program, bytes)
    assert len(program) % 8 == 0
    code = decode(program)
    assert 0 < len(code) <= 4096  # BPF_MAXINSNS
    assert code[-1][0] == seccomp.RET_K
    for index, (op, jt, jf, _k) in enumerate(code):
        assert op in KNOWN_CODES
        if op in JUMPS:
            assert index + 1 + max(jt, jf) < len(code)
        else:
            assert jt == jf == 0
    # The first thing checked is the architecture, and anything else is killed.
    assert code[0] == (seccomp.LD_ABS, 0, 0, seccomp.OFFSET_ARCH)
    assert code[1][0] == seccomp.JEQ_K and code[1][3] == seccomp.AUDIT_ARCH[arch]
    assert code[2] == (seccomp.RET_K, 0, 0, KILL)


def test_off_has_no_filter_and_unknown_profiles_or_arches_are_refused() -> None:
    assert seccomp.build_filter("off") is None
    assert seccomp.denied("off") == ()
    with pytest.raises(ConfigError, match="unknown seccomp profile 'lax'"):
        seccomp.build_filter("lax")
    with pytest.raises(ConfigError):
        seccomp.denied("MVP")
    with pytest.raises(SandboxError, match="riscv64"):
        seccomp.build_filter("mvp", "riscv64")
    assert seccomp.build_filter("mvp", "amd64") == seccomp.build_filter("mvp", "x86_64")


def test_every_denied_name_is_a_known_syscall() -> None:
    known = set().union(*(set(table) for table in seccomp.SYSCALLS.values()))
    assert set(seccomp.MVP_DENY + seccomp.STRICT_DENY) <= known
    for table in seccomp.SYSCALLS.values():
        assert len(set(table.values())) == len(table), "two names share a number"


HEADERS = {
    "x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
    "aarch64": "/usr/include/asm-generic/unistd.h",
}


@pytest.mark.parametrize("arch", ARCHES)
def test_syscall_numbers_match_kernel_headers(arch: str) -> None:
    header = Path(HEADERS[arch])
    if not header.exists():
        pytest.skip(f"{header} not installed (linux-libc-dev)")
    numbers = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\b", header.read_text())
    }
    checked = 0
    for name, nr in seccomp.SYSCALLS[arch].items():
        if name in numbers:  # headers older than the kernel may miss the newest calls
            assert numbers[name] == nr, name
            checked += 1
    assert checked >= len(seccomp.SYSCALLS[arch]) - 2


@pytest.mark.parametrize("arch", ARCHES)
def test_verdicts(arch: str) -> None:
    table, audit = seccomp.SYSCALLS[arch], seccomp.AUDIT_ARCH[arch]
    mvp, strict = seccomp.build_filter("mvp", arch), seccomp.build_filter("strict", arch)
    getpid = {"x86_64": 39, "aarch64": 172}[arch]
    for program in (mvp, strict):
        assert program is not None

        def verdict(name: str | int, *args: int, arch: int = audit) -> int:
            nr = table[name] if isinstance(name, str) else name
            return run(program, nr, *args, arch=arch)

        assert verdict(getpid) == ALLOW
        assert verdict(getpid, arch=0x40000003) == KILL  # i386 / other ABI
        for name in seccomp.MVP_DENY:
            if name in table:
                assert verdict(name) == EPERM, name
        assert verdict("clone3") == ENOSYS
        assert verdict("io_setup", 128) == ENOSYS  # host-wide AIO pool (fs.aio-max-nr)
        assert verdict("clone", 0x01200011) == ALLOW  # fork(): CLONE_CHILD_SETTID|CLEARTID|SIGCHLD
        assert verdict("clone", 0x00004111) == ALLOW  # vfork()
        for flag in (0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000):
            assert verdict("clone", flag | 17) == EPERM, hex(flag)
        assert verdict("ioctl", 0, seccomp.TIOCSTI) == EPERM
        assert verdict("ioctl", 0, seccomp.TIOCLINUX) == EPERM
        assert verdict("ioctl", 0, 0x5401) == ALLOW  # TCGETS
        assert verdict("personality", 0xFFFFFFFF) == ALLOW
    if arch == "x86_64":
        assert run(mvp, 0x40000000 | getpid, arch=audit) == ENOSYS  # x32
    # socket families: an allow-list in both; mknod argument checks only in strict
    sock = table["socket"]
    assert run(mvp, sock, 16, 3, 0, arch=audit) == ALLOW  # NETLINK_ROUTE (ip): own netns only
    for protocol in (4, 9, 15):  # sock_diag, audit, kobject_uevent
        assert run(mvp, sock, 16, 3, protocol, arch=audit) == EAFNOSUPPORT
    for family in (40, 17, 38, 44, 31):  # vsock, packet, alg, xdp, bluetooth
        assert run(mvp, sock, family, 1, arch=audit) == EAFNOSUPPORT
    for family in (1, 2, 10):
        assert run(mvp, sock, family, 1, arch=audit) == ALLOW
    assert run(strict, sock, 16, 3, arch=audit) == EAFNOSUPPORT  # AF_NETLINK
    assert run(strict, sock, 17, 2, arch=audit) == EAFNOSUPPORT  # AF_PACKET
    assert run(strict, sock, 2, 1 | 0o2000000, arch=audit) == ALLOW  # AF_INET stream, CLOEXEC
    assert run(strict, sock, 10, 2, arch=audit) == ALLOW  # AF_INET6 dgram
    assert run(strict, sock, 1, 5, arch=audit) == ALLOW  # AF_UNIX seqpacket
    assert run(strict, sock, 2, 3 | 0o4000, arch=audit) == EPERM  # SOCK_RAW|SOCK_NONBLOCK
    assert run(strict, sock, 10, 10, arch=audit) == EPERM  # SOCK_PACKET
    mknodat = table["mknodat"]
    assert run(strict, mknodat, 0, 0, 0o020600, arch=audit) == EPERM  # char device
    assert run(strict, mknodat, 0, 0, 0o060600, arch=audit) == EPERM  # block device
    assert run(strict, mknodat, 0, 0, 0o010600, arch=audit) == ALLOW  # FIFO
    assert run(mvp, mknodat, 0, 0, 0o020600, arch=audit) == ALLOW
    for name in seccomp.STRICT_DENY:
        assert run(strict, table[name], arch=audit) == EPERM
        assert run(mvp, table[name], arch=audit) == ALLOW
    if "mknod" in table:
        assert run(strict, table["mknod"], 0, 0o020600, arch=audit) == EPERM
        assert run(strict, table["mknod"], 0, 0o100600, arch=audit) == ALLOW  # regular file


# Runs in a child process as root with every capability: installs only the filter, then probes.
PROBE = r"""
import ctypes, errno, json, os, socket, subprocess, sys
from sandkasten.runtime import seccomp

profile, workdir = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
os.unshare(os.CLONE_NEWNS)
MS_REC, MS_PRIVATE = 0x4000, 0x40000
assert libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0, "make / private"

program = seccomp.build_filter(profile)
buf = ctypes.create_string_buffer(program, len(program))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(program) // 8, ctypes.addressof(buf))
assert libc.prctl(38, 1, 0, 0, 0) == 0
assert libc.prctl(22, 2, ctypes.c_void_p(ctypes.addressof(fprog)), 0, 0) == 0
table = seccomp.SYSCALLS[seccomp.host_arch()]

def call(name, *args):
    nr = table[name] if isinstance(name, str) else name
    result = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if result == 0 and name == "clone":
        os._exit(0)  # a clone that got through: the copy leaves at once
    if result > 0 and name == "clone":
        os.waitpid(result, 0)
    return 0 if result >= 0 else ctypes.get_errno()

def attempt(action):
    try:
        action()
        return 0
    except OSError as e:
        return e.errno

r = {}
mounted = libc.mount(b"none", workdir.encode(), b"tmpfs", 0, None) == 0
r["mount"] = 0 if mounted else ctypes.get_errno()
path = ctypes.create_string_buffer(workdir.encode())
r["umount2"] = call("umount2", ctypes.addressof(path), 0)
r["clone_newuser"] = call("clone", 0x10000000 | 17, 0, 0, 0, 0)
r["clone3"] = call("clone3", 0, 0)
fd = os.open("/proc/self/ns/net", os.O_RDONLY)
r["setns"] = attempt(lambda: os.setns(fd, 0))
r["ptrace_attach"] = call("ptrace", 16, 0x3FFFFFFF, 0, 0)
r["reboot_bad_magic"] = call("reboot", 0, 0, 0, 0)
r["bpf"] = call("bpf", 0xFFFF, 0, 0)
r["keyctl"] = call("keyctl", 0, -3, 0)
r["io_uring_setup"] = call("io_uring_setup", 0, 0)
r["perf_event_open"] = call("perf_event_open", 0, 0, -1, -1, 0)
r["process_vm_readv"] = call("process_vm_readv", os.getpid(), 0, 0, 0, 0, 0)
r["clock_settime"] = call("clock_settime", 12345, 0)
fstype = ctypes.create_string_buffer(b"nosuchfs")
r["fsopen"] = call("fsopen", ctypes.addressof(fstype), 0)
rd, wr = os.pipe()
char = ctypes.c_char(b"x")
r["tiocsti"] = call("ioctl", rd, 0x5412, ctypes.addressof(char))
if seccomp.host_arch() == "x86_64":
    r["x32_getpid"] = call(0x40000000 | 39)
dev = os.path.join(workdir, "null")
r["mknod_chr"] = attempt(lambda: os.mknod(dev, 0o20600, os.makedev(1, 3)))
if os.path.exists(dev):
    os.unlink(dev)
r["mkfifo"] = attempt(lambda: os.mkfifo(os.path.join(workdir, "fifo")))
r["netlink"] = attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close())
r["packet"] = attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0).close())
raw_type = socket.SOCK_RAW | socket.SOCK_CLOEXEC
r["inet_raw"] = attempt(lambda: socket.socket(socket.AF_INET, raw_type, 1).close())
r["inet_stream"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
r["unix_pair"] = attempt(lambda: [s.close() for s in socket.socketpair()])
pid = os.fork()
if pid == 0:
    os._exit(7)
r["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
r["spawn_true"] = subprocess.run(["/bin/true"]).returncode
with open(os.path.join(workdir, "f"), "w") as f:
    f.write("hello")
r["file"] = open(os.path.join(workdir, "f")).read()
# Last, as they change this process's namespaces if they get through.
r["unshare_net"] = attempt(lambda: os.unshare(os.CLONE_NEWNET))
r["unshare_user"] = attempt(lambda: os.unshare(os.CLONE_NEWUSER))
print(json.dumps(r))
"""

DENIED_BY_BOTH = {
    name: errno.EPERM
    for name in (
        "mount", "umount2", "unshare_net", "unshare_user", "clone_newuser", "setns",
        "ptrace_attach", "reboot_bad_magic", "bpf", "keyctl", "io_uring_setup",
        "perf_event_open", "process_vm_readv", "clock_settime", "fsopen", "tiocsti",
    )
}  # fmt: skip
WORKING = {
    "clone3": errno.ENOSYS, "mkfifo": 0, "inet_stream": 0, "unix_pair": 0,
    "fork": 7, "spawn_true": 0, "file": "hello",
}  # fmt: skip
EXPECTED = {
    "mvp": {**DENIED_BY_BOTH, **WORKING, "mknod_chr": 0, "netlink": 0, "packet": errno.EAFNOSUPPORT,
            "inet_raw": 0},
    "strict": {
        **DENIED_BY_BOTH, **WORKING, "mknod_chr": errno.EPERM, "netlink": errno.EAFNOSUPPORT,
        "packet": errno.EAFNOSUPPORT, "inet_raw": errno.EPERM,
    },
}  # fmt: skip


@pytest.fixture
def workdir(privileged):
    path = tempfile.mkdtemp(prefix="sandkasten-seccomp-")
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to show the filter alone refuses")
@pytest.mark.parametrize("profile", FILTERING)
def test_filter_on_the_real_kernel(profile: str, workdir: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, profile, workdir],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    expected = dict(EXPECTED[profile])
    if seccomp.host_arch() == "x86_64":
        expected["x32_getpid"] = errno.ENOSYS
    assert results == expected


VSOCK_PROBE = """
import errno, socket
def attempt(family, kind, protocol=0):
    try:
        socket.socket(family, kind, protocol).close()
        return 0
    except OSError as e:
        return e.errno
print(attempt(40, socket.SOCK_STREAM), attempt(16, socket.SOCK_RAW, 15), attempt(16, socket.SOCK_RAW, 4),
      attempt(16, socket.SOCK_RAW, 0), attempt(2, socket.SOCK_STREAM))
"""


def test_vsock_and_netlink_are_refused_in_a_sandbox_without_network(runtime, python_image):
    """AF_VSOCK is not confined by the network namespace (it reaches the hypervisor and the host),
    nor are kernel uevents; with network_mode none the default profile refuses them."""
    from sandkasten.runtime.spec import ExecRequest

    sid = "s-seccomp-vsock"
    runtime.create(runtime.spec(sid, python_image, network_mode="none"))
    res = runtime.exec(sid, ExecRequest("x-probe", f"python3 -c '{VSOCK_PROBE}'"))
    out = runtime.read_output(sid, "x-probe")
    assert res.exit_code == 0, out
    vsock, uevent, diag, route, inet = map(int, out[0].split())
    assert (vsock, uevent, diag) == (errno.EAFNOSUPPORT,) * 3
    assert (route, inet) == (0, 0)


SHARED_POOLS_PROBE = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
ctx = ctypes.c_ulong(0)
nr = {"x86_64": 206, "aarch64": 0}[os.uname().machine]
rc = libc.syscall(nr, 16, ctypes.byref(ctx))
print(ctypes.get_errno() if rc != 0 else 0)
fds = []
try:
    while len(fds) < 160:
        fds.extend(os.openpty())
except OSError as e:
    print(len(fds) // 2, errno.errorcode[e.errno])
else:
    print(len(fds) // 2, "none")
"""


def test_a_sandbox_cannot_drain_the_hosts_pty_and_aio_pools(runtime, python_image):
    """ptys (kernel.pty.max) and kernel AIO contexts (fs.aio-max-nr) are host-wide: a sandbox
    gets at most setup.DEVPTS_MAX ptys, and io_setup answers ENOSYS."""
    from sandkasten.runtime.setup import DEVPTS_MAX
    from sandkasten.runtime.spec import ExecRequest

    sid = "s-shared-pools"
    runtime.create(runtime.spec(sid, python_image))
    res = runtime.exec(sid, ExecRequest("x-pools", f"python3 -c '{SHARED_POOLS_PROBE}'", timeout_ms=30_000))
    out = runtime.read_output(sid, "x-pools")[0].decode().split()
    assert res.exit_code == 0, out
    assert int(out[0]) == errno.ENOSYS
    assert (int(out[1]), out[2]) == (DEVPTS_MAX, "ENOSPC"), out
