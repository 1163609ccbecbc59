"""Sandkasten as a sandbox provider of the OpenAI Agents SDK (`pip install 'sandkasten[agents]'`).

    from agents.sandbox import SandboxAgent, SandboxRunConfig
    from sandkasten.agents import SandkastenSandboxClient, SandkastenSandboxClientOptions

A `SandboxAgent`'s shell (`exec_command`, `write_stdin`), file tools (`apply_patch`,
`view_image`) and workspace snapshots run in a Sandkasten sandbox; every command is an event in
the daemon's journal, tagged with the agent run's trace id (`sandkasten audit export`), and a
sandbox is resumed — files, processes, shell — after the agent process or the daemon died.
See `sandkasten.agents.client` for resume and quickstart/agent/sandbox_agent.py for a whole agent."""

try:
    import agents.sandbox  # noqa: F401 - the SDK's sandbox support (openai-agents 0.24+)
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("sandkasten.agents needs the OpenAI Agents SDK with sandbox support (openai-agents "
                      ">= 0.24): pip install 'sandkasten[agents]'") from e

from sandkasten.agents.client import SandkastenSandboxClient
from sandkasten.agents.session import SandkastenSandboxSession
from sandkasten.agents.state import SandkastenSandboxClientOptions, SandkastenSandboxSessionState

__all__ = ["SandkastenSandboxClient", "SandkastenSandboxClientOptions", "SandkastenSandboxSession",
           "SandkastenSandboxSessionState"]
