"""What confines a sandbox under a config — and, as plainly, what does not.

Who runs this: `sandkasten security` (with or without the daemon). Pure: reads the config
and the seccomp tables, nothing else. Every gap named here is one an attacker inside a
sandbox, or a chaos test, could reach today; it leaves the list only with the code that
closes it (and a test).
"""

from __future__ import annotations

from sandkasten.config import Config
from sandkasten.runtime import seccomp
from sandkasten.runtime.setup import DEVPTS_MAX


def report(cfg: Config) -> dict:
    sec, d = cfg.security, cfg.defaults
    return {
        "namespaces": ["mnt", "pid", "uts", "ipc", "net", "cgroup"],  # zygote.NAMESPACES
        "run_as": {"uid": sec.run_as_uid, "gid": sec.run_as_gid},
        "capabilities": "all dropped (bounding, effective, permitted, inheritable, ambient); securebits locked",
        "no_new_privs": True,
        "seccomp": {"profile": sec.seccomp, "denied": list(seccomp.denied(sec.seccomp)),
                    "enosys": list(seccomp.MVP_ENOSYS) if sec.seccomp != "off" else [],
                    "socket_families": ("unix, inet, inet6" + (", netlink (route only)" if sec.seccomp == "mvp" else "")
                                        if sec.seccomp != "off" else "any")},
        "rootfs": "overlay over the image, pivot_root" + (", read-only" if d.readonly_rootfs else ""),
        "network_default": d.network_mode,
        "disk": (f"{d.disk_limit_mb} MiB ext4 of its own per sandbox (upper layer and per-session /workspace)"
                 if d.disk_limit_mb else "no quota (defaults.disk_limit_mb: 0)"),
        "shared_host_pools": f"ptys: {DEVPTS_MAX} per sandbox; kernel AIO (io_setup): refused"
                             + ("" if sec.seccomp != "off" else " — not with seccomp off"),
        "gaps": gaps(cfg),
    }


def gaps(cfg: Config) -> list[str]:
    """The remaining weaknesses, worst first."""
    sec, d = cfg.security, cfg.defaults
    found = [
        "no user namespace (security.userns is not implemented): a sandbox's uid 0 is the host's uid 0, "
        "held back only by dropped capabilities, no_new_privs and seccomp; a kernel bug reachable through "
        "the syscalls still allowed is a way out (there is no VM boundary: the host kernel is shared)",
        f"every sandbox runs commands as the same uid ({sec.run_as_uid}): per-user kernel limits are shared by "
        "all sessions — inotify instances and watches (fs.inotify.max_user_*), pipe buffer pages "
        "(fs.pipe-user-pages-*), message queues — so one session can use them up for the others",
        "seccomp is a deny-list of syscalls (socket families are an allow-list): a syscall added by a newer "
        "kernel is allowed until it is listed",
        "the persistent shell runs the user's code in its own process: code in that process can choose how "
        "its own command reports (exit code) and plant functions or traps that change how later commands of "
        "the same session run; other processes (background jobs, subshells, programs) cannot forge a result",
        "a persistent workspace (workspace_id) is a host directory with no quota of its own; exec logs "
        f"(up to 256 MiB per command) live outside the sandbox's disk until limits.log_retention_seconds "
        f"({cfg.limits.log_retention_seconds} s) after the session ended",
        "the runner (PID 1) is kept out of the OOM killer's choice by oom_score_adj -1000 only where the "
        "host grants CAP_SYS_RESOURCE; elsewhere commands are raised to +1000 instead, which a runner larger "
        "than the memory limit does not outweigh",
        "CPU is limited by quota, not isolated: sandboxes share caches and cores (timing side channels)",
    ]
    if sec.seccomp == "off":
        found.insert(0, "seccomp is off: every syscall the dropped capabilities allow is open")
    if sec.run_as_uid == 0:
        found.insert(0, "commands run as uid 0: root without capabilities, but owner of the image's files")
    if not d.disk_limit_mb:
        found.insert(0, "no disk quota: a sandbox can fill the host's disk through / and /workspace")
    if d.network_mode == "bridge" or cfg.network.egress_allow:
        found.append("bridge mode filters IPv4 egress only by destination address (no IPv6, no per-port rules)")
    return found
