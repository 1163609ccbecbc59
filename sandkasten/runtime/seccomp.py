"""The seccomp deny filter a sandboxed shell runs under: a classic BPF program built here, in pure
Python, without libseccomp.

Who runs where: the zygote (the single-threaded spawner) calls `build_filter` before it forks,
through `privileges.prepare`. The forked runner, after pivot_root into an image that may hold
neither Python nor libseccomp, only hands the finished bytes to the kernel (`privileges.apply`).

Profiles (`security.seccomp` in the config):

- ``off``: no filter. Capabilities are still dropped and no_new_privs is still set.
- ``mvp``: refuses (EPERM) the syscalls a sandboxed workload has no business making: mounting
  and namespace changes (mount, umount2, pivot_root, chroot, the new mount API, unshare, setns,
  clone with any CLONE_NEW* flag), kernel and system administration (modules, kexec, reboot,
  swap, acct, quotas, syslog, setting clocks), cross-process access (ptrace, process_vm_*,
  pidfd_getfd), file handles (open_by_handle_at, name_to_handle_at), the big unprivileged
  attack surfaces (bpf, keyrings, userfaultfd, perf_event_open, io_uring), x86 port I/O, vhangup,
  and terminal injection (ioctl TIOCSTI / TIOCLINUX). io_setup gets ENOSYS (kernel AIO contexts
  come from one host-wide pool, fs.aio-max-nr; callers fall back). clone3 gets ENOSYS, because its flags sit
  in memory a filter cannot read; libc then falls back to clone, whose flags the filter checks.
  Sockets come from an allow-list of families: AF_UNIX, AF_INET, AF_INET6, and AF_NETLINK only
  for NETLINK_ROUTE (what `ip` needs, confined to the sandbox's own network namespace). Everything
  else gets EAFNOSUPPORT — above all AF_VSOCK, which no network namespace confines (it reaches the
  hypervisor and the host's vsock services even with network_mode none), and the other netlink
  protocols (kernel uevents, audit, sock_diag, …).
  Most of these already need a capability that `privileges.apply` drops; the filter is the second
  wall, in case of a kernel bug behind the first, and the only wall for the ones an unprivileged
  process may use (user namespaces, io_uring, userfaultfd, keyrings, perf, bpf).
- ``strict``: mvp, plus: sockets only of family AF_UNIX, AF_INET, AF_INET6 (no netlink at all:
  breaks `ip`, `ss`), no raw or packet sockets (SOCK_RAW, SOCK_PACKET), mknod/mknodat of
  character or block devices (FIFOs and sockets are fine), fanotify_init, move_pages,
  migrate_pages. Raw sockets and device nodes
  already need CAP_NET_RAW and CAP_MKNOD, which are dropped; strict refuses them also by filter.

Every program starts by checking seccomp_data.arch against the architecture it was built for
(anything else, e.g. a 32-bit compat syscall, kills the process), and on x86_64 refuses x32
syscalls (nr >= 0x40000000, ENOSYS) so they cannot alias a denied 64-bit one. Argument checks
read only the low 32 bits of an argument: clone's flags, socket's domain and type, ioctl's
request and mknod's mode are all truncated to 32 bits by the kernel itself.
"""

from __future__ import annotations

import errno
import platform
import struct

from ..errors import ConfigError, SandboxError

PROFILES = ("off", "mvp", "strict")

# Syscall numbers, from the kernel's uapi tables (x86_64: arch/x86/entry/syscalls/syscall_64.tbl;
# aarch64: include/uapi/asm-generic/unistd.h). tests/test_seccomp.py compares them with the
# headers installed on the machine. A name missing from an arch (iopl, ioperm, mknod on aarch64)
# does not exist there and needs no rule.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "ioctl": 16, "socket": 41, "io_setup": 206, "clone": 56, "ptrace": 101, "syslog": 103,
        "mknod": 133, "uselib": 134, "personality": 135, "vhangup": 153, "pivot_root": 155,
        "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165,
        "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172,
        "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179,
        "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246, "add_key": 248,
        "request_key": 249, "keyctl": 250, "migrate_pages": 256, "mknodat": 259,
        "unshare": 272, "move_pages": 279, "perf_event_open": 298, "fanotify_init": 300,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305,
        "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313,
        "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
        "pidfd_getfd": 438, "mount_setattr": 442, "quotactl_fd": 443, "open_tree_attr": 467,
    },
    "aarch64": {
        "io_setup": 0, "lookup_dcookie": 18, "ioctl": 29, "mknodat": 33, "umount2": 39, "mount": 40,
        "pivot_root": 41, "chroot": 51, "vhangup": 58, "quotactl": 60, "acct": 89,
        "personality": 92, "unshare": 97, "kexec_load": 104, "init_module": 105,
        "delete_module": 106, "clock_settime": 112, "syslog": 116, "ptrace": 117,
        "reboot": 142, "settimeofday": 170, "adjtimex": 171, "socket": 198, "add_key": 217,
        "request_key": 218, "keyctl": 219, "clone": 220, "swapon": 224, "swapoff": 225,
        "migrate_pages": 238, "move_pages": 239, "perf_event_open": 241,
        "fanotify_init": 262, "name_to_handle_at": 264, "open_by_handle_at": 265,
        "clock_adjtime": 266, "setns": 268, "process_vm_readv": 270,
        "process_vm_writev": 271, "finit_module": 273, "bpf": 280, "userfaultfd": 282,
        "kexec_file_load": 294, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435, "pidfd_getfd": 438,
        "mount_setattr": 442, "quotactl_fd": 443, "open_tree_attr": 467,
    },
}

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}

# Refused with EPERM outright, by profile (strict = mvp + these).
MVP_DENY = (
    "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsmount", "fsconfig", "fspick",
    "open_tree", "open_tree_attr", "move_mount", "mount_setattr", "unshare", "setns",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    "bpf", "keyctl", "add_key", "request_key", "userfaultfd", "perf_event_open",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "name_to_handle_at",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "lookup_dcookie",
    "iopl", "ioperm", "vhangup", "uselib",
)
STRICT_DENY = ("fanotify_init", "move_pages", "migrate_pages")
# Answered ENOSYS ("not implemented here"), which callers treat as a reason to fall back: io_setup
# takes from fs.aio-max-nr, one limit for the whole host, which one sandbox could use up for all
# (libaio users fall back to threads; glibc's POSIX AIO never calls it).
MVP_ENOSYS = ("io_setup",)

# Every CLONE_NEW* flag that fits legacy clone's flags word (CLONE_NEWTIME, 0x80, does not: those
# bits are clone's exit signal; a time namespace needs unshare or clone3, both refused).
CLONE_NAMESPACE_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
NETLINK_ROUTE = 0
SOCK_TYPE_MASK, SOCK_RAW, SOCK_PACKET = 0xF, 3, 10
S_IFMT, S_IFCHR, S_IFBLK = 0o170000, 0o020000, 0o060000
X32_SYSCALL_BIT = 0x40000000

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# Classic BPF opcodes (linux/filter.h) and struct seccomp_data offsets (linux/seccomp.h;
# both supported arches are little-endian, so an argument's low word comes first).
LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
RET_K = 0x06  # BPF_RET | BPF_K
OFFSET_NR, OFFSET_ARCH = 0, 4
INSTRUCTION = struct.Struct("<HBBI")  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}


def arg_low(index: int) -> int:
    """Offset of the low 32 bits of syscall argument `index` in struct seccomp_data."""
    return 16 + 8 * index


def host_arch() -> str:
    return normalize_arch(platform.machine())


def normalize_arch(arch: str) -> str:
    try:
        return _ARCH_ALIASES[arch.lower()]
    except KeyError:
        raise SandboxError(
            f"unable to build seccomp filter for architecture {arch!r}: unsupported "
            f"(supported: {', '.join(AUDIT_ARCH)})",
            arch=arch,
        ) from None


def denied(profile: str, arch: str | None = None) -> tuple[str, ...]:
    """Names of the syscalls `profile` refuses outright on `arch` (argument checks not listed)."""
    check_profile(profile)
    if profile == "off":
        return ()
    table = SYSCALLS[normalize_arch(arch) if arch else host_arch()]
    names = MVP_DENY + (STRICT_DENY if profile == "strict" else ())
    return tuple(name for name in names if name in table)


def check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ConfigError(
            f"unknown seccomp profile {profile!r}: expected one of {', '.join(PROFILES)}",
            key="security.seccomp",
            value=profile,
        )


def build_filter(profile: str, arch: str | None = None) -> bytes | None:
    """The BPF program (packed struct sock_filter array) for `profile` on `arch` (default: this
    host's); None for "off"."""
    check_profile(profile)
    if profile == "off":
        return None
    arch = normalize_arch(arch) if arch else host_arch()
    table = SYSCALLS[arch]
    strict = profile == "strict"
    p = Program()

    p.load(OFFSET_ARCH)
    p.jeq(AUDIT_ARCH[arch], "native")
    p.ret(RET_KILL_PROCESS)
    p.label("native")
    p.load(OFFSET_NR)
    if arch == "x86_64":
        p.jump(JGE_K, X32_SYSCALL_BIT, "enosys")
    p.jeq(table["clone"], "clone")
    p.jeq(table["clone3"], "enosys")
    p.jeq(table["ioctl"], "ioctl")
    p.jeq(table["socket"], "socket")
    if strict:
        if "mknod" in table:
            p.jeq(table["mknod"], "mknod")
        p.jeq(table["mknodat"], "mknodat")
    for name in MVP_ENOSYS:
        p.jeq(table[name], "enosys")
    for name in denied(profile, arch):
        p.jeq(table[name], "eperm")
    p.ret(RET_ALLOW)

    p.label("clone")  # clone(flags, ...): no new namespaces
    p.load(arg_low(0))
    p.jump(JSET_K, CLONE_NAMESPACE_FLAGS, "eperm")
    p.ret(RET_ALLOW)

    p.label("ioctl")  # ioctl(fd, request, ...): no faking terminal input
    p.load(arg_low(1))
    p.jeq(TIOCSTI, "eperm")
    p.jeq(TIOCLINUX, "eperm")
    p.ret(RET_ALLOW)

    p.label("socket")  # socket(domain, type, protocol): an allow-list of families
    p.load(arg_low(0))
    for family in (AF_UNIX, AF_INET, AF_INET6):
        p.jeq(family, "socket_type")
    if not strict:
        p.jeq(AF_NETLINK, "netlink")
    p.ret(RET_ERRNO | errno.EAFNOSUPPORT)
    if not strict:
        p.label("netlink")  # only routing, in the sandbox's own network namespace
        p.load(arg_low(2))
        p.jeq(NETLINK_ROUTE, "allow")
        p.ret(RET_ERRNO | errno.EAFNOSUPPORT)
    p.label("socket_type")
    if strict:  # type also carries SOCK_NONBLOCK / SOCK_CLOEXEC: mask them off
        p.load(arg_low(1))
        p.emit(AND_K, SOCK_TYPE_MASK)
        p.jeq(SOCK_RAW, "eperm")
        p.jeq(SOCK_PACKET, "eperm")
    p.label("allow")
    p.ret(RET_ALLOW)

    if strict:
        # mknod(path, mode, dev) and mknodat(dirfd, path, mode, dev): no device nodes
        for label, mode_arg in (("mknod", 1), ("mknodat", 2)):
            p.label(label)
            p.load(arg_low(mode_arg))
            p.emit(AND_K, S_IFMT)
            p.jeq(S_IFCHR, "eperm")
            p.jeq(S_IFBLK, "eperm")
            p.ret(RET_ALLOW)

    p.label("enosys")
    p.ret(RET_ERRNO | errno.ENOSYS)
    p.label("eperm")
    p.ret(RET_ERRNO | errno.EPERM)
    return p.assemble()


class Program:
    """A classic BPF program under construction: instructions whose jump targets are labels,
    resolved to forward offsets (0..255, as BPF allows) by `assemble`."""

    def __init__(self) -> None:
        self.instructions: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def emit(self, code: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self.instructions.append((code, jt, jf, k))

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name} placed twice")
        self.labels[name] = len(self.instructions)

    def load(self, offset: int) -> None:
        self.emit(LD_ABS, offset)

    def jump(self, code: int, k: int, target: str) -> None:
        """If the condition holds go to `target`, else fall through."""
        self.emit(code, k, jt=target)

    def jeq(self, k: int, target: str) -> None:
        self.jump(JEQ_K, k, target)

    def ret(self, value: int) -> None:
        self.emit(RET_K, value)

    def assemble(self) -> bytes:
        out = bytearray()
        for index, (code, jt, jf, k) in enumerate(self.instructions):
            out += INSTRUCTION.pack(code, self._offset(index, jt), self._offset(index, jf), k)
        return bytes(out)

    def _offset(self, index: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[target] - index - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"jump from {index} to {target} out of BPF range: {offset}")
        return offset
