"""Configuration: `sandkasten.yaml` plus `SANDKASTEN_*` environment overrides.

Unknown keys and bad values stop the start with a message that names the key
(DESIGN.md §6). The result is a tree of frozen dataclasses; nothing here does I/O
except `load`, which reads one file and the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import yaml

from sandkasten.errors import ConfigError
from sandkasten.schema.vocabulary import NETWORK_MODES

SECCOMP_PROFILES = ("off", "mvp", "strict")
DURABILITIES = ("normal", "full")
LOST_SANDBOX_POLICIES = ("recreate", "fail")
MAX_INT = 2**53                 # larger numbers do not survive JSON and overflow SQLite
MAX_SECONDS = 10 * 365 * 86_400  # ten years: an expiry further away overflows dates


@dataclass(frozen=True)
class Defaults:
    cpu_limit: float = 1.0
    mem_limit_mb: int = 512
    pids_limit: int = 256
    max_exec_timeout_ms: int = 600_000
    exec_timeout_ms: int = 120_000
    network_mode: str = "none"
    readonly_rootfs: bool = False
    max_output_bytes: int = 1_048_576
    disk_limit_mb: int = 2048     # each sandbox's own disk (its writes to / and /workspace); 0: no quota


@dataclass(frozen=True)
class Limits:
    """Upper bounds a client may ask for per session."""

    max_cpu_limit: float = 4.0
    max_mem_limit_mb: int = 8192
    max_pids_limit: int = 4096
    max_ttl_seconds: int = 86_400
    max_body_bytes: int = 16 * 1024 * 1024
    body_timeout_seconds: float = 60.0      # a request body must arrive within this (slow bodies hold memory)
    max_sessions: int = 256                 # sessions not ended (pool members included) this daemon grants
    max_total_mem_mb: int = 0               # their mem_limit_mb in all; 0: twice the host's memory
    log_retention_seconds: int = 7 * 86_400  # exec logs of a session ended this long ago are removed
    max_file_bytes: int = 64 * 1024 * 1024
    max_archive_bytes: int = 1024 * 1024 * 1024   # a whole /workspace as one tar (fs/archive)


@dataclass(frozen=True)
class Workspace:
    enabled: bool = True


@dataclass(frozen=True)
class Pool:
    enabled: bool = False
    images: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Security:
    seccomp: str = "mvp"
    userns: bool = False
    run_as_uid: int = 65534
    run_as_gid: int = 65534


@dataclass(frozen=True)
class Network:
    """Bridge mode (`network_mode: bridge`): host bridge, sandbox subnet, egress allow-list."""

    bridge: str = "sk0"
    subnet: str = "10.213.0.0/16"
    egress_allow: tuple[str, ...] = ()      # CIDRs or host names (resolved at start) for every sandbox
    session_egress_within: tuple[str, ...] = ("0.0.0.0/0",)  # what a session's own egress_allow may name
    dns: tuple[str, ...] = ()               # resolver addresses sandboxes may query on port 53
    enable_ip_forward: bool = False         # set net.ipv4.ip_forward=1 (host-wide) for egress past the host


@dataclass(frozen=True)
class Journal:
    durability: str = "normal"
    busy_timeout_s: float = 10.0   # how long a write waits for another writer's lock
    startup_check: str = "full"    # full: PRAGMA integrity_check before serving; quick: quick_check
    # "" (the SQLite file db_path), sqlite:///PATH, or postgresql+psycopg|asyncpg://… (a
    # journal shared by several hosts; see docs/cluster.md)
    url: str = ""


@dataclass(frozen=True)
class Cluster:
    """Several hosts on one shared journal (journal.url = postgresql…; docs/cluster.md)."""

    host_id: str = ""                 # default: the machine's hostname
    advertise_address: str = ""       # what other nodes forward to; default http://<listen>
    max_sessions: int = 100           # placement puts no more sessions on this host
    heartbeat_seconds: float = 2.0
    host_timeout_seconds: float = 15.0  # no heartbeat for this long: the host is lost
    forward_timeout_seconds: float = 900.0


@dataclass(frozen=True)
class Processes:
    """Background processes and terminals beside a session's shell."""

    max_per_session: int = 16              # running at once
    max_log_bytes: int = 64 * 1024 * 1024  # output kept per process (the oldest is dropped past it)


@dataclass(frozen=True)
class Audit:
    record_input: bool = True   # process.input events carry the bytes typed (always: size and sha256)


@dataclass(frozen=True)
class Reconcile:
    lost_sandbox_policy: str = "fail"


@dataclass(frozen=True)
class Console:
    """The web console under /console (sandkasten.console): on by default, off with enabled: false.
    `key` is a separate login key for the console; empty means log in with the API key."""

    enabled: bool = True
    key: str = ""


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:8080"
    api_key: str = ""
    data_dir: Path = Path("/var/lib/sandkasten")
    db_path: Path | None = None
    default_image: str = "base"
    allowed_images: tuple[str, ...] = ()
    session_ttl_seconds: int = 1800
    idle_timeout_seconds: int = 0
    defaults: Defaults = field(default_factory=Defaults)
    limits: Limits = field(default_factory=Limits)
    workspace: Workspace = field(default_factory=Workspace)
    pool: Pool = field(default_factory=Pool)
    security: Security = field(default_factory=Security)
    network: Network = field(default_factory=Network)
    journal: Journal = field(default_factory=Journal)
    reconcile: Reconcile = field(default_factory=Reconcile)
    cluster: Cluster = field(default_factory=Cluster)
    processes: Processes = field(default_factory=Processes)
    audit: Audit = field(default_factory=Audit)
    console: Console = field(default_factory=Console)
    cgroup_parent: str = ""        # "": this install's own (`sandkasten-<id>`, see sandkasten.install)
    database_url: str = ""  # the same as journal.url (DESIGN.md's name for it)

    # -- derived paths (one place names every directory under data_dir) --
    @property
    def database_path(self) -> Path:
        return self.db_path or self.data_dir / "sandkasten.db"

    @property
    def journal_target(self) -> Path | str:
        """Where the journal lives: the SQLite file, or the PostgreSQL URL of a shared journal."""
        url = self.journal.url or self.database_url
        if not url:
            return self.database_path
        if url.startswith("sqlite:///"):
            return Path(url[len("sqlite:///"):]).expanduser().absolute()
        return url

    @property
    def shared_journal(self) -> bool:
        """A journal in PostgreSQL: this daemon is one host of a cluster."""
        return isinstance(self.journal_target, str)

    @property
    def host_id(self) -> str:
        import socket

        return self.cluster.host_id or socket.gethostname()

    @property
    def advertise_address(self) -> str:
        return (self.cluster.advertise_address or f"http://{self.listen}").rstrip("/")

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def sessions_dir(self) -> Path:
        return self.data_dir / "sessions"

    @property
    def workspaces_dir(self) -> Path:
        return self.data_dir / "workspaces"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def image_allowed(self, name: str) -> bool:
        return not self.allowed_images or name in self.allowed_images


# ---------------------------------------------------------------- loading

_SECTIONS = {
    "defaults": Defaults,
    "limits": Limits,
    "workspace": Workspace,
    "pool": Pool,
    "security": Security,
    "network": Network,
    "journal": Journal,
    "reconcile": Reconcile,
    "cluster": Cluster,
    "processes": Processes,
    "audit": Audit,
    "console": Console,
}


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (if any), apply `SANDKASTEN_*` overrides, validate."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"unable to read config {p}: file not found") from None
        except OSError as e:
            raise ConfigError(f"unable to read config {p}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"unable to read config {p}: not UTF-8 text (byte {e.start})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"unable to parse config {p}: {_yaml_problem(e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"unable to parse config {p}: top level must be a mapping")
        raw = loaded
    raw = _apply_env(raw, env)
    return from_mapping(raw)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: what is wrong and where."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if not problem:
        return " ".join(str(e).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _env_value(value: str) -> Any:
    """An environment value read as YAML (`true`, `256`, `[a, b]`); text that is not valid
    YAML (`[abc`) is taken as the plain string, and the key's type check then judges it."""
    if value == "":
        return ""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """`SANDKASTEN_DATA_DIR=/x` sets `data_dir`; `SANDKASTEN_DEFAULTS__MEM_LIMIT_MB=256`
    (double underscore) or `SANDKASTEN_DEFAULTS_MEM_LIMIT_MB` sets a nested key."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    top = {f.name for f in dataclasses.fields(Config)}
    skip = {"SANDKASTEN_URL", "SANDKASTEN_API_KEY_FILE", "SANDKASTEN_CONFIG", "SANDKASTEN_MIGRATIONS_DIR"}
    for name, value in env.items():
        if not name.startswith("SANDKASTEN_") or name in skip:
            continue
        key = name[len("SANDKASTEN_"):].lower()
        section: str | None
        if "__" in key:
            section, sub = key.split("__", 1)
        else:
            section, sub = _split_nested(key)
        parsed = _env_value(value)
        if section is None:
            if key not in top:
                raise ConfigError(f"unknown config key from environment {name}")
            out[key] = parsed if key not in ("api_key", "listen") else value
        else:
            if section not in _SECTIONS or sub not in {f.name for f in dataclasses.fields(_SECTIONS[section])}:
                _removed(f"{section}.{sub}")
                raise ConfigError(f"unknown config key from environment {name}")
            sect = out.setdefault(section, {})
            if not isinstance(sect, dict):
                raise ConfigError(f"invalid config key {section}: must be a mapping")
            sect[sub] = value if (section, sub) == ("console", "key") else parsed   # a key is text as given
    return out


def _split_nested(key: str) -> tuple[str | None, str]:
    for section in _SECTIONS:
        if key.startswith(section + "_"):
            return section, key[len(section) + 1:]
    return None, key


def from_mapping(raw: Mapping[str, Any]) -> Config:
    values: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {key!r}")
        if key in _SECTIONS:
            values[key] = _section(key, _SECTIONS[key], value)
        else:
            values[key] = _coerce(key, fields[key].type, value)
    cfg = Config(**values)
    _validate(cfg)
    return cfg


# Keys a config once had that never did anything: a config that still sets one is told to drop
# it (by name), like any unknown key, rather than silently keeping a setting that does nothing.
REMOVED_KEYS = {
    "reconcile.resync_seconds": "the reconciler watches sandboxes continuously, it has no resync period",
    "workspace.persist_by_default": "a session's files persist only in a workspace it names (workspace_id)",
}


def _removed(key: str) -> None:
    if key in REMOVED_KEYS:
        raise ConfigError(f"config key {key!r} was removed, it had no effect: {REMOVED_KEYS[key]}; "
                          f"delete it from the config")


def _section(name: str, cls: type, value: Any) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise ConfigError(f"invalid config key {name}: must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in value.items():
        if k not in fields:
            _removed(f"{name}.{k}")
            raise ConfigError(f"unknown config key '{name}.{k}'")
        kwargs[k] = _coerce(f"{name}.{k}", fields[k].type, v)
    return cls(**kwargs)


def yes_no(text: str) -> bool | None:
    """A yes/no word as configs, query strings and command lines spell it: true/false, yes/no,
    1/0 (any case); None for anything else."""
    return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())


def _coerce(key: str, typ: Any, value: Any) -> Any:
    t = str(typ)
    try:
        if t == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and (answer := yes_no(value)) is not None:
                return answer
            raise ValueError("expected true or false")
        if t == "int":
            if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("expected an integer")
            if abs(value) > MAX_INT:
                raise ValueError(f"too large (at most {MAX_INT})")
            return value
        if t == "float":
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError("expected a number") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError("expected a finite number")
            if abs(value) > MAX_INT:
                raise ValueError(f"too large (at most {MAX_INT})")
            return float(value)
        if t == "str":
            if value is None:
                return ""
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError("expected a string")
            return str(value)
        if t in ("Path", "Path | None"):
            if value is None and "None" in t:
                return None
            if not isinstance(value, str) or not value:
                raise ValueError("expected a path")
            return Path(value).expanduser().absolute()
        if t.startswith("tuple"):
            if value is None:
                return ()
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError("expected a list of strings")
            return tuple(value)
        if t.startswith("Mapping"):
            if value is None:
                return {}
            if not isinstance(value, Mapping):
                raise ValueError("expected a mapping of image name to count")
            out = {}
            for k, v in value.items():
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"count for {k!r} must be a non-negative integer")
                out[str(k)] = v
            return out
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config key {key}: {e} (got {value!r})") from None
    raise ConfigError(f"invalid config key {key}: unsupported type {t}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"invalid config key {key}: must be greater than zero (got {value})")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"invalid config key {key}: must be one of {', '.join(choices)} (got {value!r})")


def _validate(cfg: Config) -> None:
    try:
        host, port = cfg.host, cfg.port
        if not host or not 0 < port < 65536:
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError(f"invalid config key listen: expected HOST:PORT (got {cfg.listen!r})") from None
    d = cfg.defaults
    for key in ("cpu_limit", "mem_limit_mb", "pids_limit", "max_exec_timeout_ms", "exec_timeout_ms",
                "max_output_bytes"):
        _positive(f"defaults.{key}", getattr(d, key))
    for f in dataclasses.fields(Limits):
        if f.name == "max_total_mem_mb" and cfg.limits.max_total_mem_mb == 0:
            continue  # 0: derived from the host's memory
        _positive(f"limits.{f.name}", getattr(cfg.limits, f.name))
    _positive("session_ttl_seconds", cfg.session_ttl_seconds)
    if cfg.idle_timeout_seconds < 0:
        raise ConfigError("invalid config key idle_timeout_seconds: must be zero (off) or positive")
    for key, value in (("session_ttl_seconds", cfg.session_ttl_seconds), ("limits.max_ttl_seconds",
                       cfg.limits.max_ttl_seconds), ("idle_timeout_seconds", cfg.idle_timeout_seconds)):
        if value > MAX_SECONDS:
            raise ConfigError(f"invalid config key {key}: at most {MAX_SECONDS} (ten years) (got {value})")
    if d.disk_limit_mb != 0 and d.disk_limit_mb < 16:
        raise ConfigError(f"invalid config key defaults.disk_limit_mb: 0 (no quota) or at least 16 "
                          f"(got {d.disk_limit_mb})")
    _one_of("defaults.network_mode", d.network_mode, NETWORK_MODES)
    _one_of("security.seccomp", cfg.security.seccomp, SECCOMP_PROFILES)
    if cfg.security.userns:
        raise ConfigError("invalid config key security.userns: user namespaces are not supported yet "
                          "(sandboxes drop every capability and run as run_as_uid instead)")
    _one_of("journal.durability", cfg.journal.durability, DURABILITIES)
    _one_of("journal.startup_check", cfg.journal.startup_check, ("quick", "full"))
    _one_of("reconcile.lost_sandbox_policy", cfg.reconcile.lost_sandbox_policy, LOST_SANDBOX_POLICIES)
    _positive("journal.busy_timeout_s", cfg.journal.busy_timeout_s)
    for key, url in (("journal.url", cfg.journal.url), ("database_url", cfg.database_url)):
        if url and not re.match(r"^(sqlite:///.+|postgres(ql)?(\+(psycopg|asyncpg))?://.+)$", url):
            raise ConfigError(f"invalid config key {key}: expected sqlite:///PATH or "
                              f"postgresql+psycopg://… / postgresql+asyncpg://… (got {_redact(url)!r})")
    cl = cfg.cluster
    for key in ("max_sessions", "heartbeat_seconds", "host_timeout_seconds", "forward_timeout_seconds"):
        _positive(f"cluster.{key}", getattr(cl, key))
    if cl.host_timeout_seconds < 2 * cl.heartbeat_seconds:
        raise ConfigError("invalid config key cluster.host_timeout_seconds: must be at least twice "
                          "cluster.heartbeat_seconds (a late heartbeat is not a dead host)")
    if cl.host_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", cl.host_id):
        raise ConfigError(f"invalid config key cluster.host_id: expected 1-63 of [A-Za-z0-9_.-] (got {cl.host_id!r})")
    if cl.advertise_address and not re.fullmatch(r"https?://[^/\s]+/?", cl.advertise_address):
        raise ConfigError(f"invalid config key cluster.advertise_address: expected http://HOST:PORT "
                          f"(got {cl.advertise_address!r})")
    if cfg.pool.enabled and cfg.shared_journal:
        raise ConfigError("invalid config key pool.enabled: the pre-warmed pool is not supported on a shared "
                          "journal (several hosts) yet; turn it off or use a SQLite journal")
    if cfg.journal.url and cfg.database_url and cfg.journal.url != cfg.database_url:
        raise ConfigError("invalid config key database_url: differs from journal.url (set one of them)")
    _positive("processes.max_per_session", cfg.processes.max_per_session)
    if cfg.processes.max_log_bytes < 64 * 1024:
        raise ConfigError("invalid config key processes.max_log_bytes: at least 65536 (64 KiB)")
    if d.cpu_limit > cfg.limits.max_cpu_limit:
        raise ConfigError("invalid config key defaults.cpu_limit: above limits.max_cpu_limit")
    if d.mem_limit_mb > cfg.limits.max_mem_limit_mb:
        raise ConfigError("invalid config key defaults.mem_limit_mb: above limits.max_mem_limit_mb")
    if d.pids_limit > cfg.limits.max_pids_limit:
        raise ConfigError("invalid config key defaults.pids_limit: above limits.max_pids_limit")
    if d.exec_timeout_ms > d.max_exec_timeout_ms:
        raise ConfigError("invalid config key defaults.exec_timeout_ms: above defaults.max_exec_timeout_ms")
    if cfg.session_ttl_seconds > cfg.limits.max_ttl_seconds:
        raise ConfigError(f"invalid config key session_ttl_seconds: above limits.max_ttl_seconds "
                          f"({cfg.session_ttl_seconds} > {cfg.limits.max_ttl_seconds})")
    # one directory name under the cgroup roots: no path (no "/", so no absolute path and no
    # empty segment) and no ".." anywhere
    if cfg.cgroup_parent and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", cfg.cgroup_parent)
                              or ".." in cfg.cgroup_parent):
        raise ConfigError(f"invalid config key cgroup_parent: expected one directory name, 1-128 of "
                          f"[A-Za-z0-9_.-] starting alphanumeric, without '..' and without '/', or empty for "
                          f"this install's own (got {cfg.cgroup_parent!r})")
    _validate_network(cfg.network)
    if cfg.allowed_images and cfg.default_image not in cfg.allowed_images:
        raise ConfigError(
            f"invalid config key default_image: {cfg.default_image!r} is not in allowed_images")
    unusable = [name for name, count in cfg.pool.images.items()
                if count and cfg.allowed_images and name not in cfg.allowed_images]
    if cfg.pool.enabled and unusable:  # its members could never be handed out
        raise ConfigError(f"invalid config key pool.images: {', '.join(map(repr, unusable))} "
                          f"not in allowed_images")
    if not cfg.api_key and not _is_loopback(cfg.host):
        raise ConfigError(
            f"invalid config key api_key: an empty api_key is refused on the non-loopback address {cfg.host}")


def _redact(url: str) -> str:
    """A URL as shown in messages: its password replaced by ***."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)


def _validate_network(n: Network) -> None:
    if not re.match(r"^[A-Za-z0-9_.-]{1,15}$", n.bridge) or n.bridge.startswith("sk-"):
        raise ConfigError(f"invalid config key network.bridge: expected an interface name of 1-15 "
                          f"[A-Za-z0-9_.-], not starting with 'sk-' (sandbox veths) (got {n.bridge!r})")
    try:
        subnet = ipaddress.IPv4Network(n.subnet)
    except ValueError as e:
        raise ConfigError(f"invalid config key network.subnet: {e} (got {n.subnet!r})") from None
    if not subnet.is_private or not 8 <= subnet.prefixlen <= 29:
        raise ConfigError(f"invalid config key network.subnet: expected a private IPv4 range from /8 to /29 "
                          f"(got {n.subnet!r})")
    host = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9.-]{1,253}$")
    for entry in n.egress_allow:
        try:
            ipaddress.IPv4Network(entry)
        except ValueError as e:
            if "/" in entry or not host.match(entry):
                raise ConfigError(f"invalid config key network.egress_allow: {entry!r}: {e}") from None
    for entry in n.session_egress_within:
        try:
            ipaddress.IPv4Network(entry)
        except ValueError as e:
            raise ConfigError(f"invalid config key network.session_egress_within: {entry!r}: {e}") from None
    for entry in n.dns:
        try:
            ipaddress.IPv4Address(entry)
        except ValueError:
            raise ConfigError(f"invalid config key network.dns: expected IPv4 addresses (got {entry!r})") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
