"""Sandbox setup as an ordered list of named steps (data first, then executed).

Who runs this: the sandbox's future PID 1, a process forked from the single-threaded
spawner, right after `unshare` gave it new mount/uts/ipc/net/pid/cgroup namespaces. It is
still host root with every capability and still sees the host filesystem; each step
narrows that. After `pivot_root` nothing on the host is reachable except the two fds
opened before it (the runner socket and the exec-log directory).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sandkasten.runtime import syscalls as sc
from sandkasten.runtime.spec import SandboxSpec

DEVICES = {  # name: (major, minor) — the minimal /dev every program expects
    "null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0),
}
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
DEVPTS_MAX = 64   # ptys per sandbox (each terminal session, `script`, ssh… takes one)


@dataclass
class Context:
    spec: SandboxSpec
    rootfs: str          # mount point (host path) of the overlay, becomes /
    upper: str
    work: str
    run_dir: str         # host dir for the runner socket
    logs_dir: str        # host dir for exec logs
    listener: socket.socket | None = None
    logs_fd: int = -1
    net_fd: int = -1     # bridge mode: the spawner's word that eth0 is configured (see network.py)
    network: dict | None = None
    # (step name, CLOCK_MONOTONIC when it ended) per step, for the spawner's report
    clock: list[tuple[str, float]] = field(default_factory=list)
    oom_events: str = ""  # host path of the cgroup file counting OOM kills (cgroups.oom_events)
    oom_fd: int = -1


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Context], None]


def make_mounts_private(ctx: Context) -> None:
    # Nothing we mount may propagate back to the host's mount namespace.
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


def mount_overlay(ctx: Context) -> None:
    opts = f"lowerdir={ctx.spec.lower_dir},upperdir={ctx.upper},workdir={ctx.work}"
    sc.mount("overlay", ctx.rootfs, "overlay", sc.MS_NODEV, opts)


def bind_workspace(ctx: Context) -> None:
    target = os.path.join(ctx.rootfs, "workspace")
    _ensure_dir(target, 0o755)
    sc.mount(ctx.spec.workspace_dir, target, None, sc.MS_BIND)
    sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_NOSUID | sc.MS_NODEV)


def mount_proc(ctx: Context) -> None:
    # We are PID 1 of the new pid namespace, so this proc shows only the sandbox.
    target = os.path.join(ctx.rootfs, "proc")
    _ensure_dir(target, 0o555)
    sc.mount("proc", target, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)


# /proc is the sandbox's own, but parts of it still reach the host kernel. Root in a sandbox
# (run_as_uid: 0) has no capabilities, yet many sysctls check only file modes: a writable
# /proc/sys would let it set host-wide knobs such as kernel.core_pattern. So these are
# read-only, and files that leak host state are covered (as runc and bubblewrap do).
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
PROC_MASKED_FILES = ("kcore", "keys", "key-users", "timer_list", "sched_debug", "kallsyms", "kmsg")
PROC_MASKED_DIRS = ("acpi", "scsi")
RO_FLAGS = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC


def protect_proc(ctx: Context) -> None:
    proc = os.path.join(ctx.rootfs, "proc")
    for name in PROC_READ_ONLY:
        path = os.path.join(proc, name)
        if os.path.lexists(path):
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
            sc.mount(None, path, None, RO_FLAGS)
    for name in PROC_MASKED_FILES:
        path = os.path.join(proc, name)
        if os.path.lexists(path):
            sc.mount("/dev/null", path, None, sc.MS_BIND)   # still the host's /dev/null: before pivot_root
    for name in PROC_MASKED_DIRS:
        path = os.path.join(proc, name)
        if os.path.isdir(path):
            sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, "size=0")


def mount_dev(ctx: Context) -> None:
    dev = os.path.join(ctx.rootfs, "dev")
    _ensure_dir(dev, 0o755)
    sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=755,size=64k")
    for name, (major, minor) in DEVICES.items():
        path = os.path.join(dev, name)
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(path, 0o666)
    pts = os.path.join(dev, "pts")
    os.mkdir(pts, 0o755)
    # max=: ptys come from one host-wide pool (kernel.pty.max); a sandbox takes at most DEVPTS_MAX
    sc.mount("devpts", pts, "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
             f"newinstance,ptmxmode=0666,mode=620,max={DEVPTS_MAX}")
    shm = os.path.join(dev, "shm")
    os.mkdir(shm, 0o1777)
    sc.mount("tmpfs", shm, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777,size=64m")
    for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))


def mount_tmp(ctx: Context) -> None:
    target = os.path.join(ctx.rootfs, "tmp")
    _ensure_dir(target, 0o1777)
    sc.mount("tmpfs", target, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777,size=256m")


def open_host_endpoints(ctx: Context) -> None:
    # The only ways out of the sandbox, all held by the runner alone (close-on-exec, never
    # passed to the shell): the listening socket, the exec-log directory and, read-only, its
    # cgroup's OOM kill counter (each exec reports the kills it saw).
    ctx.logs_fd = os.open(ctx.logs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if ctx.oom_events:
        try:
            ctx.oom_fd = os.open(ctx.oom_events, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # no memory controller file (old kernel): kills are not counted
            ctx.oom_fd = -1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:  # bind by a relative name: AF_UNIX paths are limited to 108 bytes
        os.chdir(ctx.run_dir)
        path = "runner.sock"
        if os.path.lexists(path):
            os.unlink(path)
        sock.bind(path)
        os.chmod(path, 0o600)
    finally:
        os.fchdir(here)
        os.close(here)
    sock.listen(64)
    ctx.listener = sock


def set_hostname(ctx: Context) -> None:
    sc.sethostname(ctx.spec.hostname)


def bring_up_loopback(ctx: Context) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))


def join_network(ctx: Context) -> None:
    # Bridge mode only. The spawner creates and configures our eth0 from the host side once
    # it knows our pid; we wait for its word (EOF without one: it failed) before going on,
    # so nothing runs in a sandbox whose network is half made. No IPv6 on eth0: the
    # egress filter speaks IPv4 only.
    if ctx.net_fd < 0:
        return
    data = b""
    while chunk := os.read(ctx.net_fd, 65536):
        data += chunk
    os.close(ctx.net_fd)
    ctx.net_fd = -1
    if not data:
        raise OSError(errno.ENETUNREACH, "the spawner did not connect it to the bridge")
    ctx.network = json.loads(data)
    with open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "w") as f:  # our netns's view
        f.write("1")


def pivot_into_rootfs(ctx: Context) -> None:
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves
    # no path back to the host filesystem and no `.oldroot` dir in the upper layer.
    os.chdir(ctx.rootfs)
    sc.pivot_root(".", ".")
    sc.umount(".", sc.MNT_DETACH)
    os.chdir("/")


def write_resolv_conf(ctx: Context) -> None:
    # After pivot_root, so a symlinked /etc/resolv.conf in the image resolves inside the
    # sandbox, never on the host. Replaces the image's file in the overlay's upper layer.
    if not ctx.network or not ctx.network.get("dns"):
        return
    _ensure_dir("/etc", 0o755)
    if os.path.lexists("/etc/resolv.conf"):
        os.unlink("/etc/resolv.conf")
    fd = os.open("/etc/resolv.conf", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"nameserver {ip}\n" for ip in ctx.network["dns"]))


def remount_root_readonly(ctx: Context) -> None:
    if ctx.spec.readonly_rootfs:
        sc.mount(None, "/", None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NODEV)


STEPS: tuple[Step, ...] = (
    Step("make mounts private", make_mounts_private),
    Step("mount overlay", mount_overlay),
    Step("bind workspace", bind_workspace),
    Step("mount proc", mount_proc),
    Step("protect proc", protect_proc),
    Step("mount dev", mount_dev),
    Step("mount tmp", mount_tmp),
    Step("open host endpoints", open_host_endpoints),
    Step("set hostname", set_hostname),
    Step("bring up loopback", bring_up_loopback),
    Step("join network", join_network),
    Step("pivot root", pivot_into_rootfs),
    Step("write resolv.conf", write_resolv_conf),
    Step("remount root read-only", remount_root_readonly),
)


def run_steps(ctx: Context) -> None:
    for step in STEPS:
        try:
            step.run(ctx)
            ctx.clock.append((step.name, time.monotonic()))
        except OSError as e:
            raise SetupFailed(f"unable to {step.name} for sandbox {ctx.spec.session_id}: "
                              f"{e.strerror or e}") from None


class SetupFailed(Exception):
    pass


def _ensure_dir(path: str, mode: int) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path) or os.path.islink(path):
            raise OSError(20, f"{path} exists and is not a directory") from None
