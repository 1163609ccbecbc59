"""The three separate things (as in runc's libcontainer): *the box* (`SandboxSpec`),
*what to run* (`ExecRequest`, `ExecResult`) and *what exists* (`Observed`).
Plain frozen dataclasses; no I/O."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sandkasten.errors import InvalidRequest, SandboxError
from sandkasten.schema.vocabulary import EXEC_ID, SESSION_ID


def check_session_id(sid: str) -> str:
    if not isinstance(sid, str) or not SESSION_ID.match(sid):
        raise InvalidRequest(f"invalid session id {sid!r}: expected 3-63 of [a-z0-9-]")
    return sid


def check_exec_id(eid: str) -> str:
    if not isinstance(eid, str) or not EXEC_ID.match(eid):
        raise InvalidRequest(f"invalid exec id {eid!r}")
    return eid


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to create one sandbox. Paths are host paths."""

    session_id: str
    image: str
    lower_dir: str            # image rootfs (overlay lower layer)
    workspace_dir: str        # bound at /workspace
    hostname: str = "sandbox"
    cpu_limit: float = 1.0
    mem_limit_mb: int = 512
    pids_limit: int = 256
    network_mode: str = "none"
    egress_allow: tuple[str, ...] = ()   # bridge mode: IPv4 CIDRs this sandbox may reach (names resolved)
    readonly_rootfs: bool = False
    disk_limit_mb: int = 0    # the sandbox's own disk (upper layer + per-session workspace); 0: none
    seccomp: str = "mvp"
    uid: int = 65534
    gid: int = 65534
    env: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["env"] = dict(self.env)
        d["egress_allow"] = list(self.egress_allow)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SandboxSpec:
        return cls(**{**d, "egress_allow": tuple(d.get("egress_allow") or ())})

    def validate(self) -> SandboxSpec:
        check_session_id(self.session_id)
        for name in ("cpu_limit", "mem_limit_mb", "pids_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise InvalidRequest(f"invalid {name} {value!r}: must be greater than zero")
        if self.mem_limit_mb < 8:
            raise InvalidRequest(f"invalid mem_limit_mb {self.mem_limit_mb}: at least 8 MB are needed")
        if isinstance(self.disk_limit_mb, bool) or not isinstance(self.disk_limit_mb, int) \
                or not (self.disk_limit_mb == 0 or self.disk_limit_mb >= 16):
            raise InvalidRequest(f"invalid disk_limit_mb {self.disk_limit_mb!r}: 0 (no quota) or at least 16")
        if self.pids_limit < 4:
            raise InvalidRequest(f"invalid pids_limit {self.pids_limit}: at least 4 are needed")
        if self.network_mode not in ("none", "bridge"):
            raise InvalidRequest(f"invalid network_mode {self.network_mode!r}: expected none or bridge")
        for cidr in self.egress_allow:
            try:
                ipaddress.IPv4Network(cidr)
            except (ValueError, TypeError):
                raise InvalidRequest(f"invalid egress_allow entry {cidr!r}: expected an IPv4 CIDR") from None
        if self.egress_allow and self.network_mode != "bridge":
            raise InvalidRequest("invalid egress_allow: only network_mode bridge has egress")
        for k, v in self.env.items():
            if not isinstance(k, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k) \
                    or not isinstance(v, str) or "\0" in v:
                raise InvalidRequest(f"invalid env entry {k!r}: names are [A-Za-z_][A-Za-z0-9_]*, values strings")
        for p in (self.lower_dir, self.workspace_dir):
            if any(c in p for c in ",:\n\0"):
                raise InvalidRequest(f"invalid path {p!r}: overlayfs refuses ',' and ':' in paths")
        return self


@dataclass(frozen=True)
class ExecRequest:
    exec_id: str
    cmd: str
    timeout_ms: int = 120_000


@dataclass(frozen=True)
class ExecResult:
    exec_id: str
    exit_code: int
    cwd: str
    duration_ms: float
    stdout_bytes: int
    stderr_bytes: int
    output_sha256: str
    timed_out: bool
    truncated: bool
    shell_restarted: bool
    started_at: float
    finished_at: float
    oom_kills: int = 0        # processes the kernel's OOM killer ended in the sandbox while it ran
    log_error: str = ""       # errno name when the runner could not write the output log (ENOSPC)

    @classmethod
    def from_meta(cls, m: Mapping[str, Any]) -> ExecResult:
        """From a runner's result (one written before a field existed lacks it: its default)."""
        return cls(**{k: m["id" if k == "exec_id" else k] for k in cls.__dataclass_fields__
                      if k in m or (k == "exec_id" and "id" in m)})


@dataclass(frozen=True)
class Observed:
    """What exists for one session, read from the kernel — never from storage."""

    session_id: str
    pid: int | None            # host pid of the runner (PID 1 inside)
    start_time: int | None     # field 22 of /proc/<pid>/stat, defeats pid reuse
    alive: bool                # pid exists with the recorded start time
    answering: bool            # the runner's socket answered a ping
    cgroup: bool               # the session's cgroup exists
    populated: bool            # ... and has processes
    session_dir: bool          # overlay upper/work dirs exist

    @property
    def healthy(self) -> bool:
        return self.alive and self.answering

    @property
    def identity(self) -> tuple[int, int]:
        """(pid, start_time) of the runner, the pair the journal records of a started sandbox."""
        if self.pid is None or self.start_time is None:
            raise SandboxError(f"unable to identify the sandbox of session {self.session_id}: it has no runner")
        return self.pid, self.start_time

    @property
    def leftovers(self) -> bool:
        return not self.alive and (self.cgroup or self.session_dir)
