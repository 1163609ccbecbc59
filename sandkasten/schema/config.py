"""The config's sections as `msgspec.Struct`s: the shape `sandkasten.yaml` and `SANDKASTEN_*`
accept, defined once, next to the request bodies and validated the same way.

`sandkasten.config` reads the file and the environment, converts the whole tree into its
`Config` (the top level: these sections plus the paths and derived properties, which need
pathlib and so live there) with `msgspec.convert`, and puts msgspec's complaint in its own
words naming the key. Unknown keys, types and the size bound of every number are refused by
the conversion; what depends on several keys (ranges, choices, the loopback rule) is checked
there afterwards. Imports nothing of sandkasten; msgspec is its one dependency.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

SECCOMP_PROFILES = ("off", "mvp", "strict")
DURABILITIES = ("normal", "full")
STARTUP_CHECKS = ("quick", "full")
LOST_SANDBOX_POLICIES = ("recreate", "fail")
MAX_INT = 2**53                 # larger numbers do not survive JSON and overflow SQLite

Int = Annotated[int, Meta(ge=-MAX_INT, le=MAX_INT)]
Float = Annotated[float, Meta(ge=-MAX_INT, le=MAX_INT)]   # finite too: the bounds refuse inf and nan
Count = Annotated[int, Meta(ge=0)]


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One mapping of the config (`defaults:`, `limits:`, ...): frozen, unknown keys refused."""


class Defaults(Section, frozen=True):
    cpu_limit: Float = 1.0
    mem_limit_mb: Int = 512
    pids_limit: Int = 256
    max_exec_timeout_ms: Int = 600_000
    exec_timeout_ms: Int = 120_000
    network_mode: str = "none"
    readonly_rootfs: bool = False
    max_output_bytes: Int = 1_048_576
    disk_limit_mb: Int = 2048     # each sandbox's own disk (its writes to / and /workspace); 0: no quota


class Limits(Section, frozen=True):
    """Upper bounds a client may ask for per session."""

    max_cpu_limit: Float = 4.0
    max_mem_limit_mb: Int = 8192
    max_pids_limit: Int = 4096
    max_ttl_seconds: Int = 86_400
    max_body_bytes: Int = 16 * 1024 * 1024
    body_timeout_seconds: Float = 60.0      # a request body must arrive within this (slow bodies hold memory)
    max_sessions: Int = 256                 # sessions not ended (pool members included) this daemon grants
    max_total_mem_mb: Int = 0               # their mem_limit_mb in all; 0: twice the host's memory
    log_retention_seconds: Int = 7 * 86_400  # exec logs of a session ended this long ago are removed
    max_file_bytes: Int = 64 * 1024 * 1024
    max_archive_bytes: Int = 1024 * 1024 * 1024   # a whole /workspace as one tar (fs/archive)


class Workspace(Section, frozen=True):
    enabled: bool = True


class Pool(Section, frozen=True):
    enabled: bool = False
    images: dict[str, Count] = {}   # image name: members kept warm


class Security(Section, frozen=True):
    seccomp: str = "mvp"
    userns: bool = False
    run_as_uid: Int = 65534
    run_as_gid: Int = 65534


class Network(Section, frozen=True):
    """Bridge mode (`network_mode: bridge`): host bridge, sandbox subnet, egress allow-list."""

    bridge: str = "sk0"
    subnet: str = "10.213.0.0/16"
    egress_allow: tuple[str, ...] = ()      # CIDRs or host names (resolved at start) for every sandbox
    session_egress_within: tuple[str, ...] = ("0.0.0.0/0",)  # what a session's own egress_allow may name
    dns: tuple[str, ...] = ()               # resolver addresses sandboxes may query on port 53
    enable_ip_forward: bool = False         # set net.ipv4.ip_forward=1 (host-wide) for egress past the host


class Journal(Section, frozen=True):
    durability: str = "normal"
    busy_timeout_s: Float = 10.0   # how long a write waits for another writer's lock
    startup_check: str = "full"    # full: PRAGMA integrity_check before serving; quick: quick_check
    # "" (the SQLite file db_path), sqlite:///PATH, or postgresql+psycopg|asyncpg://… (a
    # journal shared by several hosts; see docs/cluster.md)
    url: str = ""


class Cluster(Section, frozen=True):
    """Several hosts on one shared journal (journal.url = postgresql…; docs/cluster.md)."""

    host_id: str = ""                 # default: the machine's hostname
    advertise_address: str = ""       # what other nodes forward to; default http://<listen>
    max_sessions: Int = 100           # placement puts no more sessions on this host
    heartbeat_seconds: Float = 2.0
    host_timeout_seconds: Float = 15.0  # no heartbeat for this long: the host is lost
    forward_timeout_seconds: Float = 900.0


class Processes(Section, frozen=True):
    """Background processes and terminals beside a session's shell."""

    max_per_session: Int = 16              # running at once
    max_log_bytes: Int = 64 * 1024 * 1024  # output kept per process (the oldest is dropped past it)


class Audit(Section, frozen=True):
    record_input: bool = True   # process.input events carry the bytes typed (always: size and sha256)


class Reconcile(Section, frozen=True):
    lost_sandbox_policy: str = "fail"


class Console(Section, frozen=True):
    """The web console under /console (sandkasten.console): on by default, off with enabled: false.
    `key` is a separate login key for the console; empty means log in with the API key."""

    enabled: bool = True
    key: str = ""
