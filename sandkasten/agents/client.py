"""`SandkastenSandboxClient`: Sandkasten as a sandbox provider of the OpenAI Agents SDK.

    from agents.run import RunConfig
    from agents.sandbox import SandboxAgent, SandboxRunConfig
    from sandkasten.agents import SandkastenSandboxClient, SandkastenSandboxClientOptions

    async with SandkastenSandboxClient() as client:     # SANDKASTEN_URL, SANDKASTEN_API_KEY
        run_config = RunConfig(sandbox=SandboxRunConfig(
            client=client, options=SandkastenSandboxClientOptions(image="python")))
        result = await Runner.run(agent, "…", run_config=run_config)

Resume: `client.resume(state)` reattaches to the very sandbox the state names — files, running
processes and the shell as they are, after the agent process died at any point (nothing is
torn down when a client goes away) and after the daemon was killed (sandboxes outlive it and
are adopted again). Only when that sandbox is gone (destroyed, expired, lost) is a replacement
made from the state's options; a persistent `workspace_id` keeps its files, and a snapshot
given to the run is restored into it by the SDK.

The API key never enters serialized state: it comes from the constructor or `SANDKASTEN_API_KEY`
in whichever process resumes. Connections are made in the running event loop (one client may
serve several `asyncio.run` calls) and closed by `aclose()` / `async with`."""

from __future__ import annotations

import asyncio
import uuid

from agents.sandbox.manifest import Manifest
from agents.sandbox.session import SandboxSession, SandboxSessionState
from agents.sandbox.session.dependencies import Dependencies
from agents.sandbox.session.manager import Instrumentation
from agents.sandbox.session.sandbox_client import BaseSandboxClient
from agents.sandbox.snapshot import SnapshotBase, SnapshotSpec, resolve_snapshot

from sandkasten.agents.connection import Connection
from sandkasten.agents.session import WORKSPACE, SandkastenSandboxSession
from sandkasten.agents.state import BACKEND_ID, SandkastenSandboxClientOptions, SandkastenSandboxSessionState
from sandkasten.client import errors as client_errors
from sandkasten.client import protocol
from sandkasten.schema.vocabulary import SessionStatus

LIVE = (SessionStatus.RUNNING, SessionStatus.REQUESTED)


class SandkastenSandboxClient(BaseSandboxClient[SandkastenSandboxClientOptions]):
    backend_id = BACKEND_ID
    supports_default_options = True

    def __init__(self, *, base_url: str | None = None, api_key: str | None = None, retry_for: float = 60.0,
                 instrumentation: Instrumentation | None = None, dependencies: Dependencies | None = None) -> None:
        """base_url: the default daemon for options that name none; api_key: else
        SANDKASTEN_API_KEY; retry_for: seconds to keep retrying while the daemon is away."""
        self.base_url, self._api_key, self.retry_for = base_url, api_key, retry_for
        self._instrumentation = instrumentation if instrumentation is not None else Instrumentation()
        self._dependencies = dependencies
        self._connections: dict[str, Connection] = {}

    async def __aenter__(self) -> SandkastenSandboxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        connections, self._connections = list(self._connections.values()), {}
        loop = asyncio.get_running_loop()
        for connection in connections:
            if connection.loop is loop:
                await connection.aclose()

    def connection(self, base_url: str | None = None) -> Connection:
        """The connection to the daemon at `base_url` for the running event loop."""
        key = protocol.base_url(base_url or self.base_url)
        known = self._connections.get(key)
        if known is None or known.loop is not asyncio.get_running_loop():
            known = self._connections[key] = Connection(key, self._api_key, retry_for=self.retry_for)
        return known

    # -- the SDK's client contract ---------------------------------------------------------
    async def create(self, *, snapshot: SnapshotSpec | SnapshotBase | None = None, manifest: Manifest | None = None,
                     options: SandkastenSandboxClientOptions | None = None) -> SandboxSession:
        options = options if options is not None else SandkastenSandboxClientOptions()
        manifest = _checked(manifest if manifest is not None else Manifest())
        self._validate_manifest_for_create(manifest)
        connection = self.connection(options.base_url)
        info = await connection.api.create_session(**options.create_body())
        session_id = uuid.uuid4()
        state = SandkastenSandboxSessionState(
            session_id=session_id, manifest=manifest, snapshot=resolve_snapshot(snapshot, str(session_id)),
            sandbox_id=info.id, base_url=connection.url, image=options.image, workspace_id=options.workspace_id,
            ttl_seconds=options.ttl_seconds, cpu_limit=options.cpu_limit, mem_limit_mb=options.mem_limit_mb,
            pids_limit=options.pids_limit, network_mode=options.network_mode, env=dict(options.env or {}),
            exposed_ports=options.exposed_ports)
        return self._wrap_session(self._session(state), instrumentation=self._instrumentation)

    async def resume(self, state: SandboxSessionState) -> SandboxSession:
        if not isinstance(state, SandkastenSandboxSessionState):
            raise TypeError("SandkastenSandboxClient.resume expects a SandkastenSandboxSessionState")
        state.assert_path_grants_rebound()
        _checked(state.manifest)
        api = self.connection(state.base_url).api
        try:
            reattached = (await api.get_session(state.sandbox_id)).status in LIVE
        except client_errors.SessionNotFound:
            reattached = False
        if not reattached:   # destroyed, expired or lost: a replacement from the same options
            info = await api.create_session(**state.create_body())
            state.sandbox_id = info.id
            state.workspace_root_ready = False
        inner = self._session(state)
        inner._set_start_state_preserved(reattached, system=reattached)
        return self._wrap_session(inner, instrumentation=self._instrumentation)

    async def delete(self, session: SandboxSession) -> SandboxSession:
        inner = session._inner
        if not isinstance(inner, SandkastenSandboxSession):
            raise TypeError("SandkastenSandboxClient.delete expects a SandkastenSandboxSession")
        await inner._shutdown_backend()
        return session

    def deserialize_session_state(self, payload: dict[str, object]) -> SandboxSessionState:
        return self._deserialize_session_state_payload(payload, SandkastenSandboxSessionState)

    def _session(self, state: SandkastenSandboxSessionState) -> SandkastenSandboxSession:
        return SandkastenSandboxSession(state=state, connect=lambda: self.connection(state.base_url))


def _checked(manifest: Manifest) -> Manifest:
    if manifest.root != WORKSPACE:
        raise ValueError(f"a Sandkasten sandbox keeps its workspace at {WORKSPACE}: the manifest's root "
                         f"{manifest.root!r} cannot be used (leave Manifest.root at its default)")
    return manifest
