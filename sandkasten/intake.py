"""Intake: turn what a client sent (HTTP body or CLI flags) into a validated domain command.

Shared by the HTTP API and the CLI so both refuse the same bad input with the same
message. A body is first converted into its request struct (sandkasten.schema.requests:
fields, types, fixed bounds — msgspec's complaint put in our words by `_refused`), then
checked against the config (maxima, images, workspaces). Pure apart from the image store
lookup (and DNS for egress_allow host names).
"""

from __future__ import annotations

import functools
import math
import re
import secrets
import typing
from datetime import datetime, timedelta, UTC
from typing import Any
from collections.abc import Mapping

import msgspec

from sandkasten.config import NETWORK_MODES, Config
from sandkasten.domain import commands as c
from sandkasten.errors import ImageNotAllowed, InvalidRequest, TooLarge
from sandkasten.images.store import ImageStore
from sandkasten.runtime import network as network_mod
from sandkasten.schema import requests as rq
from sandkasten.schema.vocabulary import AGENT_RUN as AGENT_RUN   # the header patterns, for the API
from sandkasten.schema.vocabulary import TOKEN, WORKSPACE_ID, ExecId, ProcessId, SessionId, WorkspaceId

ENV_ENTRY_MAX_BYTES = 128 * 1024 - 1   # MAX_ARG_STRLEN (32 pages), less the NUL
ENV_TOTAL_MAX_BYTES = 1 << 20          # execve allows a quarter of the stack limit (2 MiB of 8 MiB) in all


def new_session_id() -> SessionId:
    return SessionId("s-" + secrets.token_hex(6))


def new_exec_id() -> ExecId:
    return ExecId("x-" + secrets.token_hex(8))


# ---------------------------------------------------------------- bodies through their schema
_AT = re.compile(r"at `(?:key` in `)?\$((?:\.\w+|\[[^\]]*\])*)`$")   # `$.pty.rows`, `$.env[...]`, `key` in `$.env`
_BOUND = re.compile(r"Expected `\w+` (>=|<=) (\S+)")
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "array": "a list", "object": "an object"}


def parse[B: rq.Body](kind: type[B], body: Any) -> B:
    """`body` as the request struct `kind`, or InvalidRequest naming the field and what it must be
    (the same words for the HTTP API and the CLI)."""
    if not isinstance(body, Mapping):
        raise InvalidRequest(f"invalid {kind.what} request: the body must be a JSON object{kind.needs}")
    refuse_unknown(body, set(kind.__struct_fields__), kind.what)
    whole = {k: int(v) for k, v in body.items()   # 60.0 is the integer 60, as JSON has it
             if k in _integers(kind) and isinstance(v, float) and v.is_integer()}
    try:
        return msgspec.convert({**body, **whole} if whole else body, kind)
    except msgspec.ValidationError as e:
        raise _refused(kind, body, str(e)) from None


@functools.cache
def _integers(kind: type[rq.Body]) -> frozenset[str]:
    """The fields of `kind` that take an integer."""
    def takes_int(hint: Any) -> bool:
        return hint is int or any(takes_int(arg) for arg in typing.get_args(hint))
    hints = typing.get_type_hints(kind, include_extras=True)
    return frozenset(name for name in kind.__struct_fields__ if takes_int(hints[name]))


def _refused(kind: type[rq.Body], body: Mapping[str, Any], error: str) -> InvalidRequest:
    """msgspec's first complaint about `body` in our words: `invalid FIELD VALUE: why`."""
    missing = re.match(r"Object missing required field `(\w+)`", error)
    unknown = re.match(r"Object contains unknown field `(\w+)`", error)
    where = _AT.search(error)
    path = re.findall(r"\.(\w+)", where.group(1)) if where else []
    if missing or unknown:
        path.append((missing or unknown).group(1))   # type: ignore[union-attr]
    value: Any = body
    for name in path:
        value = value.get(name) if isinstance(value, Mapping) else None
    owner: type[rq.Body] = kind
    field = path[-1] if path else None
    if len(path) > 1 and path[0] == "pty":
        owner = rq.Terminal   # a field of a nested struct is named as itself
    elif path:
        field = path[0]       # a key or an item of an object or list field: the field is wrong
    if unknown:
        allowed = set(owner.__struct_fields__)
        return InvalidRequest(f"invalid {path[0] if len(path) > 1 else owner.what} request: unknown field(s) "
                              f"{unknown.group(1)}; allowed: {', '.join(sorted(allowed))}", fields=[unknown.group(1)])
    if field is None:
        return InvalidRequest(f"invalid {kind.what} request: {error}")
    template = owner.refused.get(field)
    if template:
        return InvalidRequest(template.format(value=value), field=field)
    if missing:
        return InvalidRequest(f"invalid {owner.what}: '{field}' is required", field=field)
    bound = _BOUND.match(error)
    if bound and not (isinstance(value, float) and not math.isfinite(value)):
        limit: Any = float(bound.group(2)) if "." in bound.group(2) else int(bound.group(2))
        which = "minimum" if bound.group(1) == ">=" else "maximum"
        return InvalidRequest(f"invalid {field} {value!r}: the {which} is {limit}", field=field, **{which: limit})
    expected = re.match(r"Expected `(\w+)", error)
    words = _KINDS.get(expected.group(1), "another type") if expected else "another value"
    return InvalidRequest(f"invalid {field} {value!r}: expected {words}", field=field)


def _within(name: str, value: Any, default: Any, maximum: Any) -> Any:
    """A converted number, `default` when absent, at most `maximum` (a bound of the config: the
    schema holds the fixed ones)."""
    if value is None:
        return default
    if not math.isfinite(value):
        raise InvalidRequest(f"invalid {name} {value!r}: expected a number", field=name)
    if value > maximum:
        raise InvalidRequest(f"invalid {name} {value!r}: the maximum is {maximum}", field=name, maximum=maximum)
    return value


def refuse_unknown(body: Mapping[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise InvalidRequest(f"invalid {what} request: unknown field(s) {', '.join(extra)}; "
                             f"allowed: {', '.join(sorted(allowed))}", fields=extra)


def _shown(name: str) -> str:
    return name if len(name) <= 64 else name[:64] + "..."


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    """Variables for every shell of the session (names and types checked by the schema).
    Bounded like the kernel bounds execve's environment: one NAME=value string at most
    MAX_ARG_STRLEN, all of them well below ARG_MAX (beyond either, no shell of the session
    could start and every exec would fail with 127)."""
    if not env:
        return {}
    if any("\0" in v for v in env.values()):
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


def _command_text(cmd: str) -> str:
    if "\0" in cmd:
        raise InvalidRequest("invalid cmd: contains a NUL byte", field="cmd")
    return cmd


def check_workspace_id(wid: Any) -> WorkspaceId:
    if not isinstance(wid, str) or not WORKSPACE_ID.match(wid) or wid in (".", ".."):
        raise InvalidRequest(f"invalid workspace_id {wid!r}: expected 1-64 of [A-Za-z0-9_.-], "
                             "starting with a letter or digit", field="workspace_id")
    return WorkspaceId(wid)


def session_command(cfg: Config, images: ImageStore, body: Mapping[str, Any] | None,
                    now: datetime | None = None) -> c.RequestSession:
    req = parse(rq.CreateSession, {} if body is None else body)   # no body: every default
    d, lim = cfg.defaults, cfg.limits
    image = cfg.default_image if req.image is None else req.image
    if not cfg.image_allowed(image):
        raise ImageNotAllowed(f"unable to create session: image {image!r} is not in allowed_images "
                              f"({', '.join(cfg.allowed_images)})", image=image)
    images.ensure_valid(image)
    ttl = _within("ttl_seconds", req.ttl_seconds, cfg.session_ttl_seconds, lim.max_ttl_seconds)
    network = d.network_mode if req.network_mode is None else str(req.network_mode)
    if network not in NETWORK_MODES:   # the config's default is checked when the config is read
        raise InvalidRequest(f"invalid network_mode {network!r}: expected one of {', '.join(NETWORK_MODES)}",
                             field="network_mode")
    egress_allow = _egress_allow(cfg, req.egress_allow, network)
    env = _env(req.env)
    if req.workspace_id is not None and not cfg.workspace.enabled:
        raise InvalidRequest("invalid workspace_id: persistent workspaces are disabled in this daemon")
    now = now or datetime.now(UTC)
    return c.RequestSession(
        image=image,
        cpu_limit=float(_within("cpu_limit", req.cpu_limit, d.cpu_limit, lim.max_cpu_limit)),
        mem_limit_mb=_within("mem_limit_mb", req.mem_limit_mb, d.mem_limit_mb, lim.max_mem_limit_mb),
        pids_limit=_within("pids_limit", req.pids_limit, d.pids_limit, lim.max_pids_limit),
        network_mode=network, egress_allow=egress_allow, env=env, ttl_seconds=ttl, workspace_id=req.workspace_id,
        readonly_rootfs=d.readonly_rootfs if req.readonly_rootfs is None else req.readonly_rootfs,
        expires_at=now + timedelta(seconds=ttl))


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
    req = parse(rq.Exec, body)
    d = cfg.defaults
    timeout = _within("timeout_ms", req.timeout_ms, d.exec_timeout_ms, d.max_exec_timeout_ms)
    _within("max_output_bytes", req.max_output_bytes, None, cfg.limits.max_file_bytes)   # refused before it runs
    check_idempotency_key(idempotency_key)
    return c.RequestExec(exec_id=new_exec_id(), cmd=_command_text(req.cmd), timeout_ms=timeout,
                         idempotency_key=idempotency_key)


def check_idempotency_key(value: str | None) -> str | None:
    """The Idempotency-Key header, checked before it is looked up anywhere (a header is read as
    latin-1: bytes that are no UTF-8 arrive as characters no database string may hold)."""
    if value is not None and not TOKEN.match(value):
        raise InvalidRequest("invalid Idempotency-Key: expected 1-200 printable ASCII characters",
                             header="Idempotency-Key")
    return value


def output_limit(cfg: Config, body: Mapping[str, Any]) -> int:
    """How much output an exec response carries: `max_output_bytes` (at most
    limits.max_file_bytes) or defaults.max_output_bytes. The full log stays on disk.
    `body` is an exec request that `exec_command` took."""
    given = body.get("max_output_bytes") if isinstance(body, Mapping) else None
    return int(_within("max_output_bytes", given, cfg.defaults.max_output_bytes, cfg.limits.max_file_bytes))


# ---------------------------------------------------------------- processes
MAX_TERMINAL = rq.MAX_TERMINAL   # rows and cols of a PTY
MAX_STDIN_BYTES = 1 << 20        # one stdin write (the runner queues at most this much unread)
DEFAULT_TERMINAL = (24, 80)   # rows, cols


def new_process_id() -> ProcessId:
    return ProcessId("p-" + secrets.token_hex(6))


def resize_request(body: Any) -> tuple[int, int]:
    """(rows, cols) of a resize request."""
    req = parse(rq.Resize, body)
    return req.rows, req.cols


def process_command(cfg: Config, body: Any, idempotency_key: str | None = None) -> c.RequestProcess:
    req = parse(rq.StartProcess, body)
    if req.cwd is not None and "\0" in req.cwd:
        raise InvalidRequest(f"invalid cwd {req.cwd!r}: expected an absolute path in the sandbox", field="cwd")
    pty: tuple[int, int] | None = None
    if req.pty is True:
        pty = DEFAULT_TERMINAL
    elif isinstance(req.pty, rq.Terminal):
        pty = (req.pty.rows or DEFAULT_TERMINAL[0], req.pty.cols or DEFAULT_TERMINAL[1])
    timeout = _within("timeout_ms", req.timeout_ms, None, cfg.limits.max_ttl_seconds * 1000)
    check_idempotency_key(idempotency_key)
    return c.RequestProcess(process_id=new_process_id(), cmd=_command_text(req.cmd), cwd=req.cwd,
                            env=_env(req.env), pty=pty, timeout_ms=timeout, idempotency_key=idempotency_key,
                            max_live=cfg.processes.max_per_session)


def stdin_data(body: Any) -> tuple[bytes, bool]:
    """(bytes, eof) of a stdin request: `data` (text) or `data_base64`, and/or `eof: true`."""
    req = parse(rq.Stdin, body)
    eof = bool(req.eof)
    data = _bytes(req.data, req.data_base64, "data", "stdin request")
    if data is None and not eof:
        raise InvalidRequest("invalid stdin request: nothing to send (give 'data', 'data_base64' or 'eof': true)")
    data = data or b""
    if len(data) > MAX_STDIN_BYTES:
        raise TooLarge(f"stdin write too large: {len(data)} bytes, at most {MAX_STDIN_BYTES} per request",
                       limit=MAX_STDIN_BYTES)
    return data, eof


def signal_number(body: Any) -> tuple[int, str]:
    """(number, name) of `{"signal": "SIGTERM" | "TERM" | 15}`."""
    import signal as signal_mod

    value = parse(rq.Signal, body).signal
    try:
        if isinstance(value, int):
            sig = signal_mod.Signals(value)
        else:
            name = value.strip().upper()
            sig = signal_mod.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (ValueError, KeyError):
        raise InvalidRequest(rq.Signal.refused["signal"].format(value=value), field="signal") from None
    return int(sig), sig.name


def _bytes(text: str | None, b64: str | None, text_field: str, what: str,
           b64_field: str | None = None) -> bytes | None:
    """The bytes a body gives as UTF-8 text or as base64 (`<text_field>_base64` unless named);
    None when it gives neither."""
    import base64
    import binascii

    b64_field = b64_field or text_field + "_base64"
    if text is not None and b64 is not None:
        raise InvalidRequest(f"invalid {what}: give '{text_field}' or '{b64_field}', not both")
    if text is not None:
        return text.encode()
    if b64 is None:
        return None
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"invalid {b64_field}: expected base64 text", field=b64_field) from None


# ---------------------------------------------------------------- files
def write_request(body: Any, limit: int) -> tuple[str, bytes]:
    """(path, bytes) of a JSON write body: {path, text | content_base64}."""
    req = parse(rq.WriteFile, body)
    data = _bytes(req.text, req.content_base64, "text", "write", b64_field="content_base64")
    if data is None:
        raise InvalidRequest("invalid write: 'text' (string) or 'content_base64' is required")
    if len(data) > limit:
        raise TooLarge(f"unable to write file: {len(data)} bytes is above the limit of {limit}", limit=limit)
    return req.path, data
