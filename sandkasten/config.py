"""Configuration: `sandkasten.yaml` plus `SANDKASTEN_*` environment overrides.

One way to validate input shapes: the config goes through the same schema mechanism as the
request bodies (sandkasten.schema). Its sections are `msgspec.Struct`s in
`sandkasten.schema.config`; `Config` (the top level, with the paths and what derives from
them) is one here. `load` reads the file and the environment, values spelled as people write
them (`yes`, `" 256 "`, `a,b`, empty for null) are read into the type their key takes, and
`msgspec.convert` builds the frozen tree, refusing unknown keys, wrong types and numbers out
of bounds; its complaint is put in our words naming the key (`_refused`). What depends on
several keys (ranges, choices, the loopback rule for an empty api_key, cgroup_parent, the
network) is checked afterwards (`_validate`). Unknown keys and bad values stop the start with
a message that names the key (DESIGN.md §6). Nothing here does I/O except `load`, which reads
one file and the environment.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import typing
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import msgspec
import yaml

from sandkasten.errors import ConfigError
from sandkasten.schema.config import (DURABILITIES, LOST_SANDBOX_POLICIES, MAX_INT, SECCOMP_PROFILES,
                                      STARTUP_CHECKS, Audit, Cluster, Console, Defaults, Int, Journal,
                                      Limits, Network, Pool, Processes, Reconcile, Section, Security,
                                      Workspace)
from sandkasten.schema.vocabulary import NETWORK_MODES

__all__ = ["DURABILITIES", "LOST_SANDBOX_POLICIES", "MAX_INT", "MAX_SECONDS", "NETWORK_MODES",
           "SECCOMP_PROFILES", "Audit", "Cluster", "Config", "Console", "Defaults", "Journal", "Limits",
           "Network", "Pool", "Processes", "Reconcile", "Security", "Workspace", "from_mapping", "load",
           "yes_no"]

MAX_SECONDS = 10 * 365 * 86_400  # ten years: an expiry further away overflows dates


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole config: top-level keys and one `Section` per mapping (sandkasten.schema.config)."""

    listen: str = "127.0.0.1:8080"
    api_key: str = ""
    data_dir: Path = Path("/var/lib/sandkasten")
    db_path: Path | None = None
    default_image: str = "base"
    allowed_images: tuple[str, ...] = ()
    session_ttl_seconds: Int = 1800
    idle_timeout_seconds: Int = 0
    defaults: Defaults = msgspec.field(default_factory=Defaults)
    limits: Limits = msgspec.field(default_factory=Limits)
    workspace: Workspace = msgspec.field(default_factory=Workspace)
    pool: Pool = msgspec.field(default_factory=Pool)
    security: Security = msgspec.field(default_factory=Security)
    network: Network = msgspec.field(default_factory=Network)
    journal: Journal = msgspec.field(default_factory=Journal)
    reconcile: Reconcile = msgspec.field(default_factory=Reconcile)
    cluster: Cluster = msgspec.field(default_factory=Cluster)
    processes: Processes = msgspec.field(default_factory=Processes)
    audit: Audit = msgspec.field(default_factory=Audit)
    console: Console = msgspec.field(default_factory=Console)
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

_SECTIONS: dict[str, type[Section]] = {   # the mappings of the top level, by key
    name: type(value) for name, value in msgspec.structs.asdict(Config()).items() if isinstance(value, Section)}


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
    top = set(Config.__struct_fields__)
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
            if section not in _SECTIONS or sub not in _SECTIONS[section].__struct_fields__:
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
    """The config a mapping (the YAML file's, with the environment applied) describes, converted
    through the schema and validated; ConfigError naming the first key that is wrong."""
    try:
        cfg = msgspec.convert(_spelled(Config, raw), Config, dec_hook=_path)
    except msgspec.ValidationError as e:
        raise _refused(raw, str(e)) from None
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


def yes_no(text: str) -> bool | None:
    """A yes/no word as configs, query strings and command lines spell it: true/false, yes/no,
    1/0 (any case); None for anything else."""
    return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())


# ------------------------------------------------------- values as written, msgspec's words as ours

def _path(kind: type, value: Any) -> Any:
    """msgspec's hook for the path keys: a non-empty string, made absolute (`~` expanded)."""
    if kind is Path and isinstance(value, str) and value:
        return Path(value).expanduser().absolute()
    raise ValueError("expected a path")


@functools.cache
def _kinds(struct: type[msgspec.Struct]) -> dict[str, type]:
    """What each key of `struct` takes, bare: bool, int, float, str, tuple, dict, Path or a Section."""
    def bare(hint: Any) -> type:
        if typing.get_origin(hint) is typing.Annotated:
            return bare(typing.get_args(hint)[0])
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
        if origin is not None and origin not in (tuple, dict):
            return bare(args[0])   # Path | None: a path
        return origin or hint
    return {f.name: bare(f.type) for f in msgspec.structs.fields(struct)}


_WHOLE = re.compile(r"\s*[-+]?\d+\s*")


def _spelled(struct: type[msgspec.Struct], raw: Mapping[Any, Any]) -> dict[Any, Any]:
    """`raw` with the values spelled as configs and the environment spell them read into the
    type their key takes: `yes`/`no` (any yes_no word), numbers in text, `a, b` for a list, null
    for an empty string, list or mapping. Anything else is left as it is, for msgspec to judge."""
    kinds = _kinds(struct)
    return {key: _spell(kinds[key], value) if key in kinds else value for key, value in raw.items()}


def _spell(kind: type, value: Any) -> Any:
    if value is None:
        empty: dict[type, Any] = {str: "", tuple: (), dict: {}}
        return empty.get(kind, {} if issubclass(kind, Section) else None)
    if issubclass(kind, Section) and isinstance(value, Mapping):
        return _spelled(kind, value)
    if kind is dict and isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        return value
    if kind is bool:
        answer = yes_no(value)
        return value if answer is None else answer
    if kind is int and _WHOLE.fullmatch(value):
        return int(value)
    if kind is float:
        try:
            return float(value)
        except ValueError:
            return value
    if kind is tuple:
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


_AT = re.compile(r" - at `(?:key` in `)?\$((?:\.\w+|\[[^\]]*\])*)`$")   # `$.pool.images[...]`, `key` in `$`
_UNKNOWN = re.compile(r"Object contains unknown field `(.*?)`(?: - at `.*)?$")


def _refused(raw: Mapping[Any, Any], error: str) -> ConfigError:
    """msgspec's first complaint about the config `raw` in our words: the key and what it takes,
    or that the key is unknown (or was removed)."""
    where = _AT.search(error)
    names: list[Any] = re.findall(r"\.(\w+)", where.group(1)) if where else []
    unknown = _UNKNOWN.match(error)
    if unknown:
        names.append(unknown.group(1))
    elif "`key` in" in error and len(names) < 2:   # a key that is no name (`1: x`)
        within: Mapping[Any, Any] = raw.get(names[0]) or {} if names else raw
        names.append(next((k for k in within if not isinstance(k, str)), "?"))
    if not names:
        return ConfigError(f"invalid config: {error}")
    if unknown or not isinstance(names[-1], str):
        if len(names) == 1:
            return ConfigError(f"unknown config key {names[0]!r}")
        _removed(f"{names[0]}.{names[1]}")
        return ConfigError(f"unknown config key '{names[0]}.{names[1]}'")
    key = ".".join(names[:2])
    section = _SECTIONS.get(names[0])
    if section is not None and len(names) == 1:
        return ConfigError(f"invalid config key {key}: must be a mapping")
    value = raw.get(names[0])
    if section is not None:
        value = value.get(names[1]) if isinstance(value, Mapping) else None
    kind = _kinds(section or Config)[names[1] if section is not None else names[0]]
    if kind in (int, float):
        value = _spell(kind, value)   # a number as read from text
    return ConfigError(f"invalid config key {key}: {_expected(kind, value, error)} (got {value!r})")


def _expected(kind: type, value: Any, error: str) -> str:
    """What a key of this kind takes, as the message says it (`value` is what was written)."""
    bound = re.search(r"Expected `\w+` [<>]=", error)
    if kind is int:
        return f"too large (at most {MAX_INT})" if bound else "expected an integer"
    if kind is float:
        if bound and math.isfinite(value):
            return f"too large (at most {MAX_INT})"
        return "expected a number" if isinstance(value, str) else "expected a finite number"
    if kind is dict and isinstance(value, Mapping):
        bad = next((k for k, v in value.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
        if bad is not None:
            return f"count for {bad!r} must be a non-negative integer"
    return {bool: "expected true or false", str: "expected a string", Path: "expected a path",
            tuple: "expected a list of strings", dict: "expected a mapping of image name to count"}[kind]


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
    for name in Limits.__struct_fields__:
        if name == "max_total_mem_mb" and cfg.limits.max_total_mem_mb == 0:
            continue  # 0: derived from the host's memory
        _positive(f"limits.{name}", getattr(cfg.limits, name))
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
    _one_of("journal.startup_check", cfg.journal.startup_check, STARTUP_CHECKS)
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
