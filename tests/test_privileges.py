"""Dropping privileges on the real kernel. Everything dangerous happens in a child process, never
in pytest's: a helper interpreter enters a private mount namespace (so a mount that slipped
through would stay there), prepares like the zygote, forks, and the forked child applies and then
probes what it can still do, printing JSON (or execs /bin/sh, as the runner will)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from sandkasten.errors import ConfigError
from sandkasten.runtime import privileges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")

NOBODY = 65534

# argv: profile uid gid workdir mode; mode "probe" prints JSON, "sh" execs a shell script.
CHILD = r"""
import builtins, ctypes, json, os, socket, subprocess, sys

profile, uid, gid, workdir, mode = sys.argv[1:6]
uid, gid = int(uid), int(gid)
libc = ctypes.CDLL(None, use_errno=True)
os.unshare(os.CLONE_NEWNS)
assert libc.mount(None, b"/", None, 0x4000 | 0x40000, None) == 0, "make / private"

from sandkasten.errors import SandboxError
from sandkasten.runtime import privileges

prepared = privileges.prepare(profile, uid, gid)  # in the "zygote", before fork
pid = os.fork()
if pid:
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

def refuse_import(name, *args, **kwargs):
    raise AssertionError(f"apply imported {name}")

try:
    real_import, builtins.__import__ = builtins.__import__, refuse_import
    try:
        privileges.apply(prepared)
    finally:
        builtins.__import__ = real_import
    if mode == "sh":
        os.execv("/bin/sh", ["sh", "-c", *sys.argv[6:]])

    def attempt(action):
        try:
            action()
            return 0
        except OSError as e:
            return e.errno

    status = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        status[key] = value.split()
    r = {"status": {k: status[k] for k in (
        "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
        "NoNewPrivs", "Seccomp")}}
    mounted = libc.mount(b"none", workdir.encode(), b"tmpfs", 0, None) == 0
    r["mount"] = 0 if mounted else ctypes.get_errno()
    r["unshare_ns"] = attempt(lambda: os.unshare(os.CLONE_NEWNS))
    r["setns"] = attempt(lambda: os.setns(os.open("/proc/self/ns/net", os.O_RDONLY), 0))
    if profile != "off":  # without the filter, TRACEME would work and leave us traced
        r["ptrace_traceme"] = 0 if libc.ptrace(0, 0, 0, 0) == 0 else ctypes.get_errno()
    r["packet"] = attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close())
    r["inet_raw"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1).close())
    device = os.path.join(workdir, "null")
    r["mknod_chr"] = attempt(lambda: os.mknod(device, 0o20600, os.makedev(1, 3)))
    r["setuid_root"] = attempt(lambda: os.setuid(0))
    path = os.path.join(workdir, f"file-{os.getuid()}")
    with open(path, "w") as f:
        f.write("written")
    r["file"] = open(path).read()
    r["spawn_true"] = subprocess.run(["/bin/true"]).returncode
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r["inet_listen"] = 0
    a, b = socket.socketpair(socket.AF_UNIX)
    a.sendall(b"ping")
    r["unix"] = b.recv(4).decode()
    try:
        privileges.apply(prepared)
        r["second_apply"] = "succeeded"
    except SandboxError as e:
        r["second_apply"] = [e.message, e.details]
    print(json.dumps(r), flush=True)
    os._exit(0)
except BaseException:
    import traceback
    traceback.print_exc()
    os._exit(1)
"""

SH_SCRIPT = r"""
grep -E '^(Uid|Gid|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status
mount -t tmpfs none "$1" 2>/dev/null; echo "mount=$?"
unshare -U true 2>/dev/null; echo "unshare_user=$?"
echo hi > "$1/sh-$(id -u)" && cat "$1/sh-$(id -u)"
"""


@pytest.fixture
def workdir(privileged):
    path = tempfile.mkdtemp(prefix="sandkasten-privileges-")
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path)


def run_child(profile: str, uid: int, gid: int, workdir: str, mode: str = "probe") -> str:
    argv = [sys.executable, "-c", CHILD, profile, str(uid), str(gid), workdir, mode]
    if mode == "sh":
        argv += [SH_SCRIPT, "sh", workdir]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def probe(profile: str, uid: int, gid: int, workdir: str) -> dict:
    return json.loads(run_child(profile, uid, gid, workdir))


def assert_unprivileged(status: dict, uid: int, gid: int, seccomp_mode: str) -> None:
    assert status["Uid"] == [str(uid)] * 4
    assert status["Gid"] == [str(gid)] * 4
    assert status["Groups"] == []
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps][0], 16) == 0, caps
    assert status["NoNewPrivs"] == ["1"]
    assert status["Seccomp"] == [seccomp_mode]


@pytest.mark.parametrize("profile", ["mvp", "strict"])
def test_apply_drops_everything_and_ordinary_work_goes_on(profile: str, workdir: str) -> None:
    r = probe(profile, NOBODY, NOBODY, workdir)
    assert_unprivileged(r["status"], NOBODY, NOBODY, "2")
    refused = {
        "mount": errno.EPERM,
        "unshare_ns": errno.EPERM,
        "setns": errno.EPERM,
        "ptrace_traceme": errno.EPERM,
        "packet": errno.EAFNOSUPPORT if profile in ("mvp", "strict") else errno.EPERM,
        "inet_raw": errno.EPERM,
        "mknod_chr": errno.EPERM,
        "setuid_root": errno.EPERM,
    }
    assert {k: r[k] for k in refused} == refused
    assert r["file"] == "written"
    assert r["spawn_true"] == 0
    assert r["inet_listen"] == 0
    assert r["unix"] == "ping"
    # Applying again fails at the first step, which needs a capability that is gone.
    message, details = r["second_apply"]
    assert message == "unable to set securebits: EPERM"
    assert details == {"step": "set securebits", "errno": errno.EPERM}


def test_off_still_drops_capabilities(workdir: str) -> None:
    r = probe("off", NOBODY, NOBODY, workdir)
    assert_unprivileged(r["status"], NOBODY, NOBODY, "0")
    assert r["mount"] == errno.EPERM
    assert r["mknod_chr"] == errno.EPERM
    assert r["file"] == "written"


def test_root_uid_keeps_no_capabilities(workdir: str) -> None:
    r = probe("mvp", 0, 0, workdir)
    assert_unprivileged(r["status"], 0, 0, "2")
    assert r["mount"] == errno.EPERM
    assert r["mknod_chr"] == errno.EPERM
    assert r["spawn_true"] == 0


def parse_sh(output: str) -> tuple[dict, list[str]]:
    status, rest = {}, []
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                           "NoNewPrivs", "Seccomp"):  # fmt: skip
            status[key] = value.split()
        else:
            rest.append(line)
    status["Groups"] = []
    return status, rest


@pytest.mark.parametrize("uid", [NOBODY, 0])
def test_a_real_shell_execd_after_apply_stays_confined(uid: int, workdir: str) -> None:
    status, rest = parse_sh(run_child("strict", uid, uid, workdir, mode="sh"))
    # Root gets no capabilities back from execve: the bounding set is empty and NOROOT is locked.
    assert_unprivileged(status, uid, uid, "2")
    assert rest[0].startswith("mount=") and rest[0] != "mount=0"
    assert rest[1:] == ["unshare_user=1", "hi"]


def test_prepare_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="unknown seccomp profile"):
        privileges.prepare("paranoid", NOBODY, NOBODY)
    for bad in (-1, 2**32 - 1, "65534", True):
        with pytest.raises(ConfigError, match="invalid sandbox uid"):
            privileges.prepare("mvp", bad, NOBODY)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid sandbox gid"):
        privileges.prepare("mvp", NOBODY, -5)


def test_prepare_reads_the_last_capability_and_packs_the_filter() -> None:
    prepared = privileges.prepare("strict", NOBODY, NOBODY)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        assert prepared.cap_last_cap == int(f.read())
    assert "strict" in repr(prepared)
    assert privileges.prepare("off", NOBODY, NOBODY)._fprog is None
