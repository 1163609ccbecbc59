"""Intake: turn what a client sent (HTTP body or CLI flags) into a validated domain command.

Shared by the HTTP API and the CLI so both refuse the same bad input with the same
message. Pure apart from the image store lookup.
"""

from __future__ import annotations

import math
import re
import secrets
from datetime import datetime, timedelta, UTC
from typing import Any
from collections.abc import Mapping

from sandkasten.config import NETWORK_MODES, Config
from sandkasten.domain import commands as c
from sandkasten.errors import ImageNotAllowed, InvalidRequest, TooLarge
from sandkasten.images.store import ImageStore
from sandkasten.runtime import network as network_mod
from sandkasten.runtime.cgroups import MIN_CPU

WORKSPACE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TOKEN = re.compile(r"^[\x21-\x7e]{1,200}$")   # Idempotency-Key, X-Request-ID: journaled and echoed
AGENT_RUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")   # X-Agent-Run: part of the journaled actor
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SESSION_FIELDS = {"image", "ttl_seconds", "workspace_id", "cpu_limit", "mem_limit_mb", "pids_limit",
                  "network_mode", "egress_allow", "env", "readonly_rootfs"}
EXEC_FIELDS = {"cmd", "timeout_ms", "raw_output", "max_output_bytes"}
ENV_ENTRY_MAX_BYTES = 128 * 1024 - 1   # MAX_ARG_STRLEN (32 pages), less the NUL
ENV_TOTAL_MAX_BYTES = 1 << 20          # execve allows a quarter of the stack limit (2 MiB of 8 MiB) in all


def new_session_id() -> str:
    return "s-" + secrets.token_hex(6)


def new_exec_id() -> str:
    return "x-" + secrets.token_hex(8)


def _number(body: Mapping[str, Any], key: str, default, kind: type, maximum, least=1):
    """body[key] as `kind` within [least, maximum]; `default` when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise InvalidRequest(f"invalid {key} {value!r}: expected {'an integer' if kind is int else 'a number'}",
                             field=key)
    if value < least:
        raise InvalidRequest(f"invalid {key} {value!r}: the minimum is {least}", field=key, minimum=least)
    if value > maximum:
        raise InvalidRequest(f"invalid {key} {value!r}: the maximum is {maximum}", field=key, maximum=maximum)
    return kind(value)


def refuse_unknown(body: Mapping[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise InvalidRequest(f"invalid {what} request: unknown field(s) {', '.join(extra)}; "
                             f"allowed: {', '.join(sorted(allowed))}", fields=extra)


def _given(body: Mapping[str, Any], key: str, default):
    """body[key], or `default` when absent or null (an empty string or object is not absent)."""
    value = body.get(key)
    return default if value is None else value


def _flag(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = _given(body, key, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"invalid {key} {value!r}: expected true or false", field=key)
    return value


def _shown(name: str) -> str:
    return name if len(name) <= 64 else name[:64] + "..."


def _env(env: Any) -> dict[str, str]:
    """Variables for every shell of the session. Bounded like the kernel bounds execve's
    environment: one NAME=value string at most MAX_ARG_STRLEN, all of them well below ARG_MAX
    (beyond either, no shell of the session could start and every exec would fail with 127)."""
    if not isinstance(env, Mapping) or not all(
            isinstance(k, str) and ENV_NAME.match(k) and isinstance(v, str) and "\0" not in v
            for k, v in env.items()):
        raise InvalidRequest("invalid env: expected an object of NAME: \"value\" strings", field="env")
    total = 0
    for k, v in env.items():
        size = len(k.encode()) + 1 + len(v.encode()) + 1
        if size > ENV_ENTRY_MAX_BYTES:
            raise InvalidRequest(f"invalid env {_shown(k)}: {size} bytes as NAME=value, the maximum is "
                                 f"{ENV_ENTRY_MAX_BYTES}", field="env", maximum=ENV_ENTRY_MAX_BYTES)
        total += size + 8   # + its pointer in envp
    if total > ENV_TOTAL_MAX_BYTES:
        raise InvalidRequest(f"invalid env: {len(env)} variables take {total} bytes, the maximum is "
                             f"{ENV_TOTAL_MAX_BYTES}", field="env", maximum=ENV_TOTAL_MAX_BYTES)
    return dict(env)


def check_workspace_id(wid: Any) -> str:
    if not isinstance(wid, str) or not WORKSPACE_ID.match(wid) or wid in (".", ".."):
        raise InvalidRequest(f"invalid workspace_id {wid!r}: expected 1-64 of [A-Za-z0-9_.-], "
                             "starting with a letter or digit", field="workspace_id")
    return wid


def session_command(cfg: Config, images: ImageStore, body: Mapping[str, Any] | None,
                    now: datetime | None = None) -> c.RequestSession:
    body = {} if body is None else body
    if not isinstance(body, Mapping):
        raise InvalidRequest("invalid session request: the body must be a JSON object")
    refuse_unknown(body, SESSION_FIELDS, "session")
    d, lim = cfg.defaults, cfg.limits
    image = _given(body, "image", cfg.default_image)
    if not isinstance(image, str) or not image:
        raise InvalidRequest(f"invalid image {image!r}: expected a name", field="image")
    if not cfg.image_allowed(image):
        raise ImageNotAllowed(f"unable to create session: image {image!r} is not in allowed_images "
                              f"({', '.join(cfg.allowed_images)})", image=image)
    images.ensure_valid(image)
    ttl = _number(body, "ttl_seconds", cfg.session_ttl_seconds, int, lim.max_ttl_seconds)
    network = _given(body, "network_mode", d.network_mode)
    if not isinstance(network, str) or network not in NETWORK_MODES:
        raise InvalidRequest(f"invalid network_mode {network!r}: expected one of {', '.join(NETWORK_MODES)}",
                             field="network_mode")
    egress_allow = _egress_allow(cfg, body.get("egress_allow"), network)
    env = _env(_given(body, "env", {}))
    workspace_id = body.get("workspace_id")
    if workspace_id is not None:
        check_workspace_id(workspace_id)
        if not cfg.workspace.enabled:
            raise InvalidRequest("invalid workspace_id: persistent workspaces are disabled in this daemon")
    readonly = _flag(body, "readonly_rootfs", d.readonly_rootfs)
    now = now or datetime.now(UTC)
    return c.RequestSession(
        image=image,
        cpu_limit=_number(body, "cpu_limit", d.cpu_limit, float, lim.max_cpu_limit, least=MIN_CPU),
        mem_limit_mb=_number(body, "mem_limit_mb", d.mem_limit_mb, int, lim.max_mem_limit_mb, least=8),
        pids_limit=_number(body, "pids_limit", d.pids_limit, int, lim.max_pids_limit, least=4),
        network_mode=network, egress_allow=egress_allow, env=env, ttl_seconds=ttl, workspace_id=workspace_id,
        readonly_rootfs=readonly, expires_at=now + timedelta(seconds=ttl))


def _egress_allow(cfg: Config, entries: Any, network: str) -> tuple[str, ...]:
    """The session's own allow-list as CIDRs: host names are resolved here, once, so the
    journal records exactly what the sandbox may reach (config `network.egress_allow` is
    added by the runtime). Bounded by `network.session_egress_within`."""
    if entries is None or entries == []:
        return ()
    if network != "bridge":
        raise InvalidRequest("invalid egress_allow: only network_mode 'bridge' has egress", field="egress_allow")
    n = cfg.network
    return network_mod.egress_entries(entries, network_mod.Settings(bridge=n.bridge, subnet=n.subnet),
                                      within=n.session_egress_within)


def exec_command(cfg: Config, body: Mapping[str, Any] | None, idempotency_key: str | None = None
                 ) -> c.RequestExec:
    if not isinstance(body, Mapping):
        raise InvalidRequest("invalid exec request: the body must be a JSON object with a 'cmd'")
    refuse_unknown(body, EXEC_FIELDS, "exec")
    cmd = body.get("cmd")
    if not isinstance(cmd, str) or not cmd.strip():
        raise InvalidRequest("invalid exec request: 'cmd' must be a non-empty string", field="cmd")
    if "\0" in cmd:
        raise InvalidRequest("invalid cmd: contains a NUL byte", field="cmd")
    d = cfg.defaults
    timeout = _number(body, "timeout_ms", d.exec_timeout_ms, int, d.max_exec_timeout_ms)
    output_limit(cfg, body)  # refused before anything runs, not after
    _flag(body, "raw_output", False)
    check_idempotency_key(idempotency_key)
    return c.RequestExec(exec_id=new_exec_id(), cmd=cmd, timeout_ms=timeout, idempotency_key=idempotency_key)


def check_idempotency_key(value: str | None) -> str | None:
    """The Idempotency-Key header, checked before it is looked up anywhere (a header is read as
    latin-1: bytes that are no UTF-8 arrive as characters no database string may hold)."""
    if value is not None and not TOKEN.match(value):
        raise InvalidRequest("invalid Idempotency-Key: expected 1-200 printable ASCII characters",
                             header="Idempotency-Key")
    return value


def output_limit(cfg: Config, body: Mapping[str, Any]) -> int:
    """How much output an exec response carries: `max_output_bytes` (at most
    limits.max_file_bytes) or defaults.max_output_bytes. The full log stays on disk."""
    return _number(body, "max_output_bytes", cfg.defaults.max_output_bytes, int, cfg.limits.max_file_bytes)


# ---------------------------------------------------------------- processes
PROCESS_FIELDS = {"cmd", "cwd", "env", "pty", "timeout_ms"}
MAX_TERMINAL = 1000          # rows and cols of a PTY
MAX_STDIN_BYTES = 1 << 20    # one stdin write (the runner queues at most this much unread)


def new_process_id() -> str:
    return "p-" + secrets.token_hex(6)


def _object(body: Any, what: str, needs: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise InvalidRequest(f"invalid {what} request: the body must be a JSON object{needs}")
    return body


def terminal_size(body: Mapping[str, Any], what: str) -> tuple[int, int]:
    for key in ("rows", "cols"):
        if body.get(key) is None:
            raise InvalidRequest(f"invalid {what}: '{key}' is required", field=key)
    return (_number(body, "rows", None, int, MAX_TERMINAL), _number(body, "cols", None, int, MAX_TERMINAL))


def process_command(cfg: Config, body: Any, idempotency_key: str | None = None) -> c.RequestProcess:
    body = _object(body, "process", " with a 'cmd'")
    refuse_unknown(body, PROCESS_FIELDS, "process")
    cmd = body.get("cmd")
    if not isinstance(cmd, str) or not cmd.strip():
        raise InvalidRequest("invalid process request: 'cmd' must be a non-empty string", field="cmd")
    if "\0" in cmd:
        raise InvalidRequest("invalid cmd: contains a NUL byte", field="cmd")
    cwd = body.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd or len(cwd) > 4096):
        raise InvalidRequest(f"invalid cwd {cwd!r}: expected an absolute path in the sandbox", field="cwd")
    pty = body.get("pty")
    if pty is not None:
        if pty is True:
            pty = {"rows": 24, "cols": 80}
        if not isinstance(pty, Mapping):
            raise InvalidRequest("invalid pty: expected {\"rows\": N, \"cols\": N} or true", field="pty")
        refuse_unknown(pty, {"rows", "cols"}, "pty")
        pty = terminal_size({"rows": 24, "cols": 80, **{k: v for k, v in pty.items() if v is not None}}, "pty")
    timeout = _number(body, "timeout_ms", None, int, cfg.limits.max_ttl_seconds * 1000)
    if idempotency_key is not None and not TOKEN.match(idempotency_key):
        raise InvalidRequest("invalid Idempotency-Key: expected 1-200 printable ASCII characters")
    return c.RequestProcess(process_id=new_process_id(), cmd=cmd, cwd=cwd, env=_env(_given(body, "env", {})),
                            pty=pty, timeout_ms=timeout, idempotency_key=idempotency_key,
                            max_live=cfg.processes.max_per_session)


def stdin_data(body: Any) -> tuple[bytes, bool]:
    """(bytes, eof) of a stdin request: `data` (text) or `data_base64`, and/or `eof: true`."""
    import base64
    import binascii

    body = _object(body, "stdin", " with 'data', 'data_base64' or 'eof'")
    refuse_unknown(body, {"data", "data_base64", "eof"}, "stdin")
    eof = _flag(body, "eof", False)
    text, b64 = body.get("data"), body.get("data_base64")
    if text is not None and b64 is not None:
        raise InvalidRequest("invalid stdin request: give 'data' or 'data_base64', not both")
    if text is not None:
        if not isinstance(text, str):
            raise InvalidRequest("invalid data: expected a string (or use data_base64 for bytes)", field="data")
        data = text.encode()
    elif b64 is not None:
        decoded: bytes | None
        try:
            decoded = base64.b64decode(b64, validate=True) if isinstance(b64, str) else None
        except (binascii.Error, ValueError):
            decoded = None
        if decoded is None:
            raise InvalidRequest("invalid data_base64: expected base64 text", field="data_base64")
        data = decoded
    elif not eof:
        raise InvalidRequest("invalid stdin request: nothing to send (give 'data', 'data_base64' or 'eof': true)")
    else:
        data = b""
    if len(data) > MAX_STDIN_BYTES:
        raise TooLarge(f"stdin write too large: {len(data)} bytes, at most {MAX_STDIN_BYTES} per request",
                       limit=MAX_STDIN_BYTES)
    return data, eof


def signal_number(body: Any) -> tuple[int, str]:
    """(number, name) of `{"signal": "SIGTERM" | "TERM" | 15}`."""
    import signal as signal_mod

    body = _object(body, "signal", " with a 'signal'")
    refuse_unknown(body, {"signal"}, "signal")
    value = body.get("signal")
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            sig = signal_mod.Signals(value)
        elif isinstance(value, str):
            name = value.strip().upper()
            sig = signal_mod.Signals[name if name.startswith("SIG") else "SIG" + name]
        else:
            raise ValueError
    except (ValueError, KeyError):
        raise InvalidRequest(f"invalid signal {value!r}: expected a name like SIGTERM, TERM or INT, or its number",
                             field="signal") from None
    return int(sig), sig.name
