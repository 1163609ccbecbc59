"""What a Sandkasten sandbox is, as the Agents SDK stores it: the client options a new sandbox
is made from, and the session state that is serialized into a `RunState` (or anywhere the
application keeps it) and read back to resume. Neither ever holds the API key: that comes from
`SANDKASTEN_API_KEY` (or the client's constructor) in the process that resumes."""

from __future__ import annotations

from typing import Any, Literal

from agents.sandbox.session.sandbox_client import BaseSandboxClientOptions
from agents.sandbox.session.sandbox_session_state import SandboxSessionState
from pydantic import Field

BACKEND_ID = "sandkasten"


class SandkastenSandboxClientOptions(BaseSandboxClientOptions):
    """How to make a Sandkasten sandbox. Every field left None takes the daemon's default
    (its `sandkasten.yaml`); the limits are bounded by the daemon's `limits:`.

    base_url: the daemon (default `SANDKASTEN_URL`, else http://127.0.0.1:8080);
    image; workspace_id (a persistent workspace: /workspace outlives the sandbox);
    ttl_seconds; cpu_limit, mem_limit_mb, pids_limit; network_mode ("none" | "bridge");
    env (set in the sandbox's shell); exposed_ports (bridge only: reachable from the daemon's
    host at the sandbox's address)."""

    type: Literal["sandkasten"] = "sandkasten"
    base_url: str | None = None
    image: str | None = None
    workspace_id: str | None = None
    ttl_seconds: int | None = None
    cpu_limit: float | None = None
    mem_limit_mb: int | None = None
    pids_limit: int | None = None
    network_mode: Literal["none", "bridge"] | None = None
    env: dict[str, str] | None = None
    exposed_ports: tuple[int, ...] = ()

    def create_body(self) -> dict[str, Any]:
        """The fields of `POST /v1/sessions` these options set (None: the daemon's default)."""
        return _create_body(self)


class SandkastenSandboxSessionState(SandboxSessionState):
    """A session as the SDK serializes it: which daemon and which Sandkasten session (`sandbox_id`,
    `s-...`), plus how to make a replacement if that session is gone when resuming."""

    type: Literal["sandkasten"] = "sandkasten"
    sandbox_id: str
    base_url: str
    image: str | None = None
    workspace_id: str | None = None
    ttl_seconds: int | None = None
    cpu_limit: float | None = None
    mem_limit_mb: int | None = None
    pids_limit: int | None = None
    network_mode: Literal["none", "bridge"] | None = None
    env: dict[str, str] = Field(default_factory=dict)

    def create_body(self) -> dict[str, Any]:
        return _create_body(self)


def _create_body(source: Any) -> dict[str, Any]:
    body = {name: getattr(source, name) for name in (
        "image", "workspace_id", "ttl_seconds", "cpu_limit", "mem_limit_mb", "pids_limit", "network_mode")}
    body["env"] = dict(source.env) if source.env else None
    return {k: v for k, v in body.items() if v is not None}
