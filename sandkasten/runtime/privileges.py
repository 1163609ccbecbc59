"""Dropping a sandboxed process's privileges: the last step before its shell is exec'd.

Without a user namespace, sandbox root *is* host root, so right before execve the process gives
up everything: supplementary groups, root's uid/gid, every capability (bounding, ambient,
effective, permitted, inheritable), any way back (securebits, no_new_privs), and then installs
the seccomp deny filter (see `seccomp`).

Who runs where:
- `prepare` runs in the zygote (the single-threaded spawner), before fork: it reads
  /proc/sys/kernel/cap_last_cap, builds the seccomp program and packs every ctypes buffer.
- `apply` runs in the forked child, after pivot_root into an image that may hold no Python and
  no libseccomp, right before execve. It imports nothing, opens nothing and dlopens nothing: libc
  and its functions were resolved when this module was imported, and the buffers are ready.
A `Prepared` holds no per-child state and may be applied in any number of children.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable

from ..errors import ConfigError, SandboxError
from . import seccomp

# The libc the interpreter already runs on (dlopen(NULL)); every symbol is resolved here, at
# import, so that nothing is looked up after fork.
_libc = ctypes.CDLL(None, use_errno=True)


def _function(name: str, *argtypes: type) -> Callable[..., int]:
    function = getattr(_libc, name)
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_ulong = ctypes.c_ulong
_prctl = _function("prctl", ctypes.c_int, _ulong, _ulong, _ulong, _ulong)
_setgroups = _function("setgroups", ctypes.c_size_t, ctypes.c_void_p)
_setresgid = _function("setresgid", ctypes.c_uint, ctypes.c_uint, ctypes.c_uint)
_setresuid = _function("setresuid", ctypes.c_uint, ctypes.c_uint, ctypes.c_uint)
_capset = _function("capset", ctypes.c_void_p, ctypes.c_void_p)

# linux/prctl.h, linux/securebits.h, linux/capability.h, linux/seccomp.h
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Root gets no capabilities from execve (NOROOT), setuid away from root always clears them
# (NO_SETUID_FIXUP locked off), KEEP_CAPS can never be turned on, no ambient capability can be
# raised — and all of it locked, so nothing in the sandbox can undo it.
SECUREBITS = (
    1 << 0  # SECBIT_NOROOT
    | 1 << 1  # SECBIT_NOROOT_LOCKED
    | 1 << 3  # SECBIT_NO_SETUID_FIXUP_LOCKED (with NO_SETUID_FIXUP itself clear)
    | 1 << 5  # SECBIT_KEEP_CAPS_LOCKED (with KEEP_CAPS itself clear)
    | 1 << 6  # SECBIT_NO_CAP_AMBIENT_RAISE
    | 1 << 7  # SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
)
ID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "leave unchanged" to setres*id


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Prepared:
    """Everything `apply` needs, built before fork. The ctypes objects are kept here so that the
    addresses handed to the kernel stay valid."""

    __slots__ = (
        "profile", "uid", "gid", "cap_last_cap",
        "_cap_header", "_cap_data", "_cap_header_address", "_cap_data_address",
        "_filter", "_fprog", "_fprog_address",
    )  # fmt: skip

    def __init__(self, profile: str, uid: int, gid: int, cap_last_cap: int, program: bytes | None):
        self.profile = profile
        self.uid = uid
        self.gid = gid
        self.cap_last_cap = cap_last_cap
        # capset(2) with version 3 takes two data structs (capabilities 0-31 and 32-63), all zero.
        self._cap_header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
        self._cap_data = (_CapData * 2)()
        self._cap_header_address = ctypes.addressof(self._cap_header)
        self._cap_data_address = ctypes.addressof(self._cap_data)
        self._filter = None
        self._fprog = None
        self._fprog_address = 0
        if program is not None:
            self._filter = ctypes.create_string_buffer(program, len(program))
            self._fprog = _SockFprog(
                len(program) // seccomp.INSTRUCTION.size, ctypes.addressof(self._filter)
            )
            self._fprog_address = ctypes.addressof(self._fprog)

    def __repr__(self) -> str:
        return (
            f"Prepared(profile={self.profile!r}, uid={self.uid}, gid={self.gid}, "
            f"cap_last_cap={self.cap_last_cap})"
        )


def prepare(profile: str, uid: int, gid: int) -> Prepared:
    """Build what `apply` needs. Runs in the zygote, before fork."""
    seccomp.check_profile(profile)
    for name, value in (("uid", uid), ("gid", gid)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= ID_MAX:
            raise ConfigError(
                f"invalid sandbox {name} {value!r}: expected an integer 0..{ID_MAX}",
                key=name,
                value=value,
            )
    return Prepared(profile, uid, gid, read_cap_last_cap(), seccomp.build_filter(profile))


def read_cap_last_cap() -> int:
    """The highest capability number this kernel knows; dropping beyond it fails with EINVAL."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        # No /proc (or an odd one): ask the kernel cap by cap, from the bounding set.
        last = -1
        while last < 63 and _prctl(PR_CAPBSET_READ, last + 1, 0, 0, 0) >= 0:
            last += 1
        if last < 0:
            raise SandboxError("unable to read the highest capability number: no /proc and "
                               "PR_CAPBSET_READ refused") from None
        return last


def apply(prepared: Prepared) -> None:
    """Give up every privilege and install the seccomp filter. Runs in the forked child right
    before execve; single-threaded (setres*id act on this thread only as far as the kernel is
    concerned). Raises SandboxError naming the step and the errno; the caller must then not exec.
    The order of the steps is forced by the capability each one needs, see the comments."""
    p = prepared
    # 1. Securebits first: changing them needs CAP_SETPCAP.
    _check(_prctl(PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0), "set securebits")
    # 2. The bounding set, while we still hold CAP_SETPCAP (PR_CAPBSET_DROP needs it in the
    #    effective set, and setresuid below empties that set). An empty bounding set means no
    #    execve can ever grant a capability again, whatever the file or the uid.
    for cap in range(p.cap_last_cap + 1):
        if _prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            _fail(f"drop capability {cap} from the bounding set")
    # 3. Ambient capabilities (needs no capability). EINVAL: a kernel before 4.3 has none.
    if _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
        _fail("clear ambient capabilities")
    # 4. Groups before the uid: setgroups and setresgid need CAP_SETGID, gone once uid leaves 0.
    _check(_setgroups(0, None), "clear supplementary groups")
    _check(_setresgid(p.gid, p.gid, p.gid), f"set gid {p.gid}")
    # 5. The uid: real, effective and saved, so no saved root uid is left to switch back to.
    #    Leaving uid 0 also clears the effective and permitted sets (securebits keep it so).
    if p.uid != 0:
        _check(_setresuid(p.uid, p.uid, p.uid), f"set uid {p.uid}")
    # 6. Effective, permitted and inheritable to zero. For uid 0 this is what empties them; for
    #    any uid it also empties the inheritable set, which setuid leaves alone. Lowering
    #    capabilities never needs one.
    _check(_capset(p._cap_header_address, p._cap_data_address), "clear capabilities")
    # 7. no_new_privs: execve of setuid or file-capability binaries grants nothing, and it is
    #    what lets an unprivileged process (we have no CAP_SYS_ADMIN left) install a filter.
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")
    # 8. seccomp last: it is for the workload, and it survives execve. Nothing above is filtered.
    if p._fprog_address:
        _check(
            _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, p._fprog_address, 0, 0),
            f"install seccomp filter {p.profile!r}",
        )


def _check(result: int, step: str) -> None:
    if result != 0:
        _fail(step)


def _fail(step: str) -> None:
    number = ctypes.get_errno()
    name = errno.errorcode.get(number, str(number))
    raise SandboxError(f"unable to {step}: {name}", step=step, errno=number)
